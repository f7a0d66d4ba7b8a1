"""`fluxtrt infer` end to end on the tiny model, and every bad input ending in one line and a non-zero exit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_image, one_error_line, run_cli


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
            "--device",
            "cpu",
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
        assert component in proc.stdout  # per-component time table: a result, on stdout
    assert f"wrote {out}" in proc.stdout
    assert "14/14" in proc.stderr  # the default loop (DPM-Solver++ 2M, 14 steps): progress, on stderr
    assert "clip" not in proc.stderr and "notice" not in proc.stderr


def test_infer_explicit_size_and_seed_is_deterministic(tmp_path, image_file):
    outs = []
    for name in ("a.png", "b.png"):
        result = run_cli(
            "infer",
            "--model",
            "tiny",
            "--device",
            "cpu",
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
        "height alone": (["--image", img, "--height", "512"], "--height 512 was given without --width: give both"),
        "negative seed": (["--image", img, "--seed", "-1"], "--seed is -1, expected an integer from 0 to 2**64 - 1"),
        "negative guidance": (["--image", img, "--guidance", "-3"], "--guidance is -3.0, expected a number >= 0"),
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
    "negative seed",
    "negative guidance",
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


# --- what the user sees: results on stdout, notices on stderr, bad input refused before the work -------------------


def test_results_on_stdout_notices_on_stderr_and_format_by_extension(tmp_path):
    """A 3000-word prompt (one line per encoder: how many tokens were dropped and where, no warning of
    transformers'), an explicit size that fitting changes and a 1x1 reference each get one notice line on stderr; the
    summary is on stdout; ``.jpg`` writes JPEG bytes."""
    src, out = tmp_path / "dot.png", tmp_path / "edit.jpg"
    Image.new("RGB", (1, 1), "red").save(src)
    words = " ".join(f"word{i}" for i in range(3000))
    result = run_cli("infer", "--model", "tiny", "--device", "cpu", "--image", str(src), "--prompt", words, "--out",
                     str(out), "--height", "512", "--width", "512", "--steps", "1")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG's start-of-image marker
    notices = [line for line in result.stderr.splitlines() if line.startswith("notice: ")]
    assert len(notices) == 4, result.stderr
    for line, encoder in zip(notices[2:], ("CLIP", "T5"), strict=True):
        kept, full, dropped = map(int, re.search(r"keeps (\d+) of (\d+) tokens; dropped (\d+) tokens", line).groups())
        assert line.startswith(f"notice: prompt 0: {encoder} keeps ")
        assert kept in (77, 512) and dropped == full - kept > 0
        assert len(line) < 200 and line.endswith(" ...'")
    assert notices[:2] == [
        "notice: --width 512 --height 512 became 1024x1024: an explicit size is scaled to an area of 1,048,576 "
        "pixels at the same aspect ratio, each side a multiple of 16",
        "notice: the reference is 1x1 px, upscaled to 1024x1024: references under 64 px on a side carry little "
        "for the edit to keep",
    ]
    assert "Token indices" not in result.stderr and len(result.stderr) < 2000
    assert "transformer" in result.stdout and f"wrote {out} (1024x1024)" in result.stdout
    assert "notice:" not in result.stdout and "transformer" not in result.stderr
    assert ".py:" not in result.stdout + result.stderr  # no source locations


def test_input_notices():
    from fluxtrt.pipeline.kontext import input_notices
    from fluxtrt.specs.flux import Resolution

    r = Resolution(1024, 1024)
    assert input_notices(["", "  ", "x"], (640, 480), (None, None), r, r, 2**20) == [
        "prompt 0 is empty: the edit follows no instruction",
        "prompt 1 is empty: the edit follows no instruction",
    ]
    assert input_notices(["x"], (64, 64), (1024, 1024), r, r, 2**20) == []  # nothing changed, nothing said


def test_tokenize_names_the_first_dropped_words(tiny):
    from fluxtrt.pipeline.text import tokenize

    prompt = " ".join(["keep"] * 60 + ["alpha", "beta", "gamma"] + ["tail"] * 200)
    _, messages = tokenize(tiny.tokenizer_2, [prompt, "short"], 64, "T5")
    assert len(messages) == 1 and messages[0].startswith("prompt 0: T5 keeps 64 of ")
    assert "starting '" in messages[0] and messages[0].count("tail") <= 8


def _out_cases(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {
        "gif": (tmp_path / "edit.gif", "has the extension '.gif', expected one of .png, .jpg, .jpeg, .webp"),
        "no extension": (tmp_path / "edit", "has no extension"),
        "under a file": (a_file / "sub" / "edit.png", "is a file, not a directory"),
        "cannot create": (Path("/proc/self/edit.png"), "no file can be created in '/proc/self'"),
    }


@pytest.mark.parametrize("case", ["gif", "no extension", "under a file", "cannot create"])
def test_unwritable_or_unknown_out_is_refused_before_the_edit(tmp_path, image_file, case):
    out, needle = _out_cases(tmp_path)[case]
    if case == "cannot create" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    result = run_cli("infer", "--model", "tiny", "--image", str(image_file), "--prompt", "p", "--out", str(out))
    line = one_error_line(result)
    assert needle in line and f"--out '{out}'" in line
    assert "denoising" not in result.stderr and not out.exists()


def test_save_failure_after_the_edit_is_one_error(tmp_path, image_file):
    """The directory went away between the check and the write: one FluxtrtError, no traceback, nothing written."""
    from fluxtrt.config import InferConfig
    from fluxtrt.errors import FluxtrtError
    from fluxtrt.pipeline.image import save_image

    folder = tmp_path / "gone"
    folder.mkdir()
    config = InferConfig(model="tiny", image=image_file, prompt="p", out=folder / "edit.webp")
    assert config.out_format == "WEBP"
    folder.rmdir()
    folder.write_text("now a file")
    with pytest.raises(FluxtrtError, match="--out .*could not be written"):
        save_image(Image.new("RGB", (8, 8)), config.out, config.out_format)
    config = InferConfig(model="tiny", image=image_file, prompt="p", out=tmp_path / "e.WEBP")
    save_image(Image.new("RGB", (8, 8)), config.out, config.out_format)
    assert (tmp_path / "e.WEBP").read_bytes()[8:12] == b"WEBP"


@pytest.mark.parametrize("side", [120, 200])  # Pillow warns above the limit and refuses above twice the limit
def test_decompression_bomb_is_one_line(tmp_path, monkeypatch, side):
    from PIL import Image as PILImage

    src = tmp_path / "big.png"
    Image.new("L", (side, 100)).save(src)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)
    result = run_cli("infer", "--model", "tiny", "--image", str(src), "--prompt", "p", "--out", str(tmp_path / "o.png"))
    line = one_error_line(result)
    assert f"has {side * 100:,} pixels, over the limit of 10,000" in line and "downscale" in line


def test_random_full_that_cannot_fit_is_refused_before_loading(tmp_path, image_file, monkeypatch):
    import fluxtrt.environment
    import fluxtrt.models.synthetic

    monkeypatch.setattr(fluxtrt.environment, "available_memory", lambda device: 8 * 2**30)
    monkeypatch.setattr(fluxtrt.models.synthetic, "build_synthetic", lambda *a, **k: pytest.fail("loaded anyway"))
    result = run_cli("infer", "--model", "random-full", "--device", "cpu", "--image", str(image_file), "--prompt", "p",
                     "--out", str(tmp_path / "o.png"))  # fmt: skip
    line = one_error_line(result)
    assert "--model random-full (16.7B parameters in fp32) needs about 68.4 GiB of memory on cpu" in line
    assert "but 8.0 GiB is available" in line and "--device cuda" in line


def test_full_parameter_count_is_the_architecture():
    """FULL_PARAMETERS (what the memory check counts) is what the full-size architecture has, counted on the meta
    device (no memory)."""
    from fluxtrt.models.synthetic import FULL, FULL_PARAMETERS, build_synthetic

    components = build_synthetic(FULL, 0, "meta", torch.float32, "random-full")
    modules = (components.transformer, components.vae, components.text_encoder, components.text_encoder_2)
    assert sum(p.numel() for m in modules for p in m.parameters()) == FULL_PARAMETERS


def test_available_memory_reads_the_host():
    from fluxtrt.environment import available_memory

    free = available_memory("cpu")
    assert free is None or 0 < free < 2**50


def test_option_messages_name_values_as_typed():
    line = one_error_line(run_cli("infer", "--model", "tiny", "--engines", "eng", "--image", "x", "--prompt", "p",
                                  "--out", "o.png"))  # fmt: skip
    assert "--model is 'tiny' and --engines is 'eng'" in line and "PosixPath" not in line


def test_compare_device_defaults_to_auto_like_infer():
    from fluxtrt.bench.config import CompareConfig
    from fluxtrt.cli import main

    for command in ("infer", "compare"):
        device = next(p for p in main.commands[command].params if p.name == "device")
        assert device.default == "auto", command
    config = CompareConfig(model="tiny")
    assert config.device == "auto"
    assert config.to_dict()["device"] == config.resolved_device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_ctrl_c_during_infer_speaks_of_the_edit_and_progress_shows_the_time_left(tmp_path, image_file, monkeypatch):
    import fluxtrt.infer

    out = tmp_path / "o.png"
    result = run_cli("infer", "--model", "tiny", "--device", "cpu", "--image", str(image_file), "--prompt", "p",
                     "--out", str(out), "--steps", "3")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    bar = [line for line in result.stderr.splitlines() if line.startswith("denoising")]
    assert bar and re.search(r"3/3 \d+:\d\d:\d\d left \d+:\d\d:\d\d$", bar[-1].rstrip()), result.stderr

    def interrupted(config, on_step=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(fluxtrt.infer, "run_infer", interrupted)
    result = run_cli("infer", "--model", "tiny", "--image", str(image_file), "--prompt", "p", "--out", str(out))
    assert result.exit_code == 130
    assert error_lines(result) == ["error: interrupted: nothing half-written was left: no image was written"]
