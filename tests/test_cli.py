"""`fluxtrt infer` end to end on the tiny model, and every bad input ending in one line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_image, run_cli


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_infer_tiny_writes_png_at_preferred_aspect(tmp_path):
    """The quick-start command: a PNG at the reference's preferred Kontext resolution."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    src, out = tmp_path / "in.png", tmp_path / "out" / "edit.png"
    make_image(640, 480).save(src)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxtrt.cli",
            "infer",
            "--model",
            "tiny",
            "--image",
            str(src),
            "--prompt",
            "make the house blue",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as img:
        assert img.format == "PNG"
        size = img.size
    # 640x480 (aspect 1.333) -> the closest preferred size in diffusers' list, 1184x880 (aspect 1.345).
    _, ew, eh = min((abs(640 / 480 - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    assert size == (ew, eh) == (1184, 880)
    for component in ("clip", "t5", "vae_encoder", "transformer", "vae_decoder"):
        assert component in proc.stderr  # per-component time table
    assert "14/14" in proc.stderr  # the default loop: DPM-Solver++ 2M, 14 steps


def test_infer_explicit_size_and_seed_is_deterministic(tmp_path, image_file):
    outs = []
    for name in ("a.png", "b.png"):
        result = run_cli(
            "infer",
            "--model",
            "tiny",
            "--image",
            str(image_file),
            "--prompt",
            "x",
            "--out",
            str(tmp_path / name),
            "--height",
            "128",
            "--width",
            "192",
            "--steps",
            "2",
            "--seed",
            "3",
        )
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / name) as img:
            outs.append(torch.from_numpy(np.asarray(img).copy()))
    # An explicit 192x128 request is fitted to the 1 MP budget at the same 3:2 aspect ratio, floored to 16.
    with Image.open(tmp_path / "a.png") as img:
        assert img.size == (1248, 832)
    assert torch.equal(outs[0], outs[1])


def _bad_cases(tmp_path, image_file):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not a PNG")
    not_ckpt = tmp_path / "not_a_checkpoint"
    not_ckpt.mkdir()
    (not_ckpt / "weights.bin").write_bytes(b"\0" * 16)
    other_ckpt = tmp_path / "other_checkpoint"
    other_ckpt.mkdir()
    (other_ckpt / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    img = str(image_file)
    return {
        "missing image": (["--image", str(tmp_path / "nope.png")], "nope.png"),
        "unreadable image": (["--image", str(not_image)], "notes.png"),
        "not a checkpoint": (["--image", img, "--model", str(not_ckpt)], "model_index.json"),
        "other pipeline": (["--image", img, "--model", str(other_ckpt)], "StableDiffusionPipeline"),
        "hub id not cached": (["--image", img, "--model", "no-such-org/no-such-model"], "hf download"),
        "zero height": (["--image", img, "--height", "0", "--width", "512"], "--height is 0"),
        "negative width": (["--image", img, "--height", "512", "--width", "-8"], "--width is -8"),
        "height alone": (["--image", img, "--height", "512"], "give both"),
        "zero steps": (["--image", img, "--steps", "0"], "--steps is 0"),
        "unknown device": (["--image", img, "--device", "tpu"], "--device is 'tpu'"),
        "unknown dtype": (["--image", img, "--dtype", "fp64"], "--dtype is 'fp64'"),
        "unknown scheduler": (["--image", img, "--scheduler", "heun"], "--scheduler is 'heun'"),
        "unknown sigmas": (["--image", img, "--sigmas", "cosine"], "--sigmas is 'cosine'"),
    }


CASES = [
    "missing image",
    "unreadable image",
    "not a checkpoint",
    "other pipeline",
    "hub id not cached",
    "zero height",
    "negative width",
    "height alone",
    "zero steps",
    "unknown device",
    "unknown dtype",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, image_file, case):
    args, needle = _bad_cases(tmp_path, image_file)[case]
    if "--model" not in args:
        args = [*args, "--model", "tiny"]
    fresh, existing = tmp_path / "fresh.png", tmp_path / "existing.png"
    existing.write_bytes(b"previous result")
    for out in (fresh, existing):
        result = run_cli("infer", "--prompt", "p", "--out", str(out), *args)
        assert result.exit_code != 0
        lines = error_lines(result)
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert needle in lines[0]
    assert not fresh.exists()
    assert existing.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the test needs a machine without it")
def test_cuda_without_cuda_is_one_clear_line(tmp_path, image_file):
    out = tmp_path / "o.png"
    result = run_cli(
        "infer", "--model", "tiny", "--image", str(image_file), "--prompt", "p", "--out", str(out), "--device", "cuda"
    )
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1 and "--device cuda" in lines[0] and "--device cpu" in lines[0]
    assert not out.exists()


def test_verbose_shows_traceback(tmp_path):
    result = run_cli(
        "--verbose",
        "infer",
        "--model",
        str(tmp_path),
        "--image",
        str(tmp_path),
        "--prompt",
        "p",
        "--out",
        str(tmp_path / "o.png"),
    )
    assert result.exit_code != 0
