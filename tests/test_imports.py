"""`import fluxtrt` and every `--help` stay light: no torch, diffusers, transformers or optional backends."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "tensorrt", "torchao", "polygraphy")


def imported_modules(code: str) -> set[str]:
    """Top-level modules a fresh interpreter imports while running ``code`` (from -X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_import_fluxtrt_is_light():
    names = imported_modules("import fluxtrt, fluxtrt.config, fluxtrt.errors, fluxtrt.specs, fluxtrt.cli")
    assert "fluxtrt" in names
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


@pytest.mark.parametrize("args", [["--help"], ["infer", "--help"], ["compare", "--help"]])
def test_help_is_light(args):
    code = f"import sys; sys.argv = ['fluxtrt', *{args!r}]; from fluxtrt.cli import main; main()"
    names = imported_modules(code)
    assert not names & set(HEAVY), sorted(names & set(HEAVY))
