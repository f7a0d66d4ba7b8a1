"""``python -m fluxtrt.cli``: the ``fluxtrt`` command."""

from fluxtrt.cli import main

main(prog_name="fluxtrt")
