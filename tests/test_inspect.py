"""``fluxtrt inspect``: the tables, and a non-zero exit naming every problem of a directory that ``infer --engines``
could not load (a real build of the tiny model, then damaged as a disk, a user or a killed build would)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil

import pytest

from tests.conftest import run_cli


@pytest.fixture
def engines(ort_engines, tmp_path):
    copy = tmp_path / "engines"
    shutil.copytree(ort_engines, copy)
    return copy


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_an_intact_directory_exits_0_and_check_hashes_every_file(engines):
    for args in ((), ("--check",)):
        result = run_cli("inspect", str(engines), *args)
        assert result.exit_code == 0 and result.stderr == "", result.stderr
        assert "transformer" in result.stdout and "onnxruntime" in result.stdout


def test_every_problem_is_named_and_the_exit_is_1(engines):
    clip = engines / "clip.onnx"
    clip.write_bytes(clip.read_bytes()[:-10])  # truncated
    (engines / "t5.onnx").unlink()  # deleted
    decoder = engines / "vae_decoder.onnx"
    data = bytearray(decoder.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    decoder.write_bytes(bytes(data))
    (engines / ".staging-transformer-4242").mkdir()  # what a killed build leaves
    manifest = json.loads((engines / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]  # a component the build never finished
    (engines / "manifest.json").write_text(json.dumps(manifest))

    result = run_cli("inspect", str(engines))
    assert result.exit_code == 1
    got = errors(result)
    assert len(got) == 5, got
    assert any("no engine for vae_encoder" in e for e in got)
    assert any(f"{clip} has" in e and "bytes but the manifest records" in e for e in got)
    assert any(f"{engines / 't5.onnx'} is missing" in e for e in got)
    assert any(f"{decoder} does not have the sha256" in e for e in got)
    assert any(".staging-transformer-4242 was left by a build that did not finish" in e for e in got)


def test_a_build_holding_the_lock_is_named(engines):
    lock = engines / ".lock"
    lock.write_text('{"pid": 4242, "command": "fluxtrt build --model tiny"}')
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a build holds it
        result = run_cli("inspect", str(engines))
        assert result.exit_code == 1
        (line,) = errors(result)
        assert "a build is writing this directory now" in line and "4242" in line
    finally:
        os.close(fd)
    result = run_cli("inspect", str(engines))  # the lock file of a build that ended is no problem
    assert result.exit_code == 0, result.stderr
