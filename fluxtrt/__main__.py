"""``python -m fluxtrt``: the same command line as ``fluxtrt``."""

from fluxtrt.cli import main

main(prog_name="fluxtrt")
