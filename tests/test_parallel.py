"""``--gpus N`` on the CPU: N gloo processes under torchrun give the edit of one process (diffusers' Ulysses attention
splits the sequence; the final latents must agree to float32 rounding), the launcher prints once, and every bad
request ends in one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxtrt.errors import FluxtrtError, InputError
from fluxtrt.specs.flux import FLUX_KONTEXT_DIMS, Resolution
from tests.conftest import make_image, one_error_line, run_cli

HERE = Path(__file__).resolve().parent


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_two_processes_give_the_latents_of_one(tiny_pipeline, tmp_path):
    """The oracle is the same edit in one process. Ulysses attention permutes the order in which each query sums
    over keys ([text_0, image_0, text_1, image_1] instead of [text, image]), so the two agree to float32 rounding,
    not bit for bit; the regionally compiled stage (fused QKV, aot_eager) is split the same way."""
    from fluxtrt.config import SamplerConfig
    from fluxtrt.parallel.launch import launch
    from fluxtrt.stages.config import FBC_OFF
    from tests.parallel_edit import EDIT

    out = tmp_path / "latents.pt"
    launch(2, [str(out), "3"], script=str(HERE / "parallel_edit.py"))
    got = torch.load(out)
    want = tiny_pipeline.edit(make_image(320, 240), "a red door", sampler=SamplerConfig(steps=3), **EDIT).latents
    assert got["world"] == 2 and got["processors"] == 2  # one double and one single block, each attention split
    for name in ("eager", "compiled"):
        assert got[name].shape == want.shape == (1, 256, 64)
        assert cosine(got[name], want) > 0.99999
        assert (got[name] - want).abs().max().item() < 1e-4 * want.abs().max().item()
    assert got["notes"] == [FBC_OFF] and "regional compile (aot_eager)" in got["features"]


def run_fluxtrt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluxtrt", *args], capture_output=True, text=True, timeout=180)


def test_infer_gpus_2_on_cpu_writes_the_image_of_one_process(tmp_path, image_file):
    """The one command a user types: the parent launches two workers; rank 0 alone prints and writes."""
    common = ["--model", "tiny", "--image", str(image_file), "--prompt", "x", "--steps", "2", "--device", "cpu"]
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert run_cli("infer", *common, "--out", str(one)).exit_code == 0
    proc = run_fluxtrt("infer", *common, "--out", str(two), "--gpus", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(f"wrote {two}") == 1 and proc.stdout.count("transformer") == 1
    assert "2 x cpu (context parallel)" in proc.stdout
    assert "error" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    a = np.asarray(Image.open(one), dtype=np.int16)
    b = np.asarray(Image.open(two), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # float32 rounding may flip one 8-bit level


def test_compare_gpus_2_names_what_it_switched_off(tmp_path):
    """Stage 1 on two CPU processes: the first-block cache is off and says why; the split is among what is on."""
    import json

    from fluxtrt.stages.config import FBC_OFF

    report = tmp_path / "report"
    stage = "1:compile=off:vae=off"
    proc = run_fluxtrt(
        "compare",
        "--model",
        "tiny",
        "--stages",
        stage,
        "--runs",
        "1",
        "--warmup",
        "0",
        "--resolution",
        "256x256",
        "--device",
        "cpu",
        "--gpus",
        "2",
        "--report",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("the transformer split over 2 processes") == 1
    (row,) = json.loads((report / "report.json").read_text())["contenders"]
    assert row["status"] == "ok" and row["details"]["unavailable"] == [FBC_OFF]
    assert row["what"] == ["fused QKV", "context parallel over 2 processes (Ulysses)"]


def test_uneven_sequence_is_refused_in_one_line(tmp_path, image_file):
    """1040x1008 has 65 x 63 = 4095 target tokens; with the 74 x 55 = 4070 of the reference, 8165: odd. Refused by
    the parent before it starts a worker (each would load the whole model first): torchrun's folder is never made."""
    import os

    out, tmp = tmp_path / "edit.png", tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "fluxtrt", "infer", "--model", "tiny", "--image", str(image_file),
                           "--prompt", "x", "--out", str(out), "--device", "cpu", "--gpus", "2", "--width", "1040",
                           "--height", "1008"], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "TMPDIR": str(tmp)})  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "8165 image tokens (4095 target + 4070 reference)" in lines[0] and "does not pad" in lines[0]
    assert not out.exists() and proc.stdout == ""
    assert not list(tmp.glob("fluxtrt-gpus-*"))  # no worker was launched


def test_the_parent_reads_the_split_from_configs_as_the_loaded_model_has_it(tiny):
    from fluxtrt.models.components import FluxKontextComponents
    from fluxtrt.models.loading import vae_scale
    from fluxtrt.specs.flux import dims_from_components

    assert vae_scale("tiny") == dims_from_components(tiny).vae_scale
    assert FluxKontextComponents.max_sequence_length == dims_from_components(tiny).t5_len
    assert vae_scale("/no/such/checkpoint") is None  # loading the model says why


def test_check_sequence_counts_tokens():
    from fluxtrt.pipeline.sizes import check_sequence

    square = Resolution(1024, 1024)  # 4096 + 4096 image tokens, 512 text tokens
    for n in (1, 2, 4, 8, 16):
        check_sequence(FLUX_KONTEXT_DIMS, square, square, n)
    with pytest.raises(InputError, match=r"8192 image tokens .* --gpus 3 .* use --gpus 2"):
        check_sequence(FLUX_KONTEXT_DIMS, square, square, 3)
    odd = Resolution(1040, 1008)  # 65 x 63 = 4095 tokens
    with pytest.raises(InputError, match=r"8191 image tokens \(4095 target \+ 4096 reference\)"):
        check_sequence(FLUX_KONTEXT_DIMS, odd, square, 2)


def test_heads_must_split_over_the_processes(tiny):
    from fluxtrt.parallel.context import World, enable_context_parallel, ulysses_degrees

    assert ulysses_degrees(24) == [1, 2, 3, 4, 6, 8, 12, 24] and ulysses_degrees(2) == [1, 2]
    world = World(rank=0, size=3, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(InputError, match="2 attention heads .* use --gpus one of 1, 2"):
        enable_context_parallel(tiny.transformer, world)  # refused before any process group is touched


def test_restrict_stage_switches_off_what_cannot_split():
    from fluxtrt.stages.config import FBC_OFF, FP8_ATTENTION_OFF, LOW_VRAM_OFF, restrict_stage, stage_config

    config, notes = restrict_stage(stage_config("4"))
    assert notes == [FBC_OFF, FP8_ATTENTION_OFF]
    assert config.first_block_cache is None and config.attention == "sdpa"
    assert (config.quant, config.compile, config.fuse_qkv) == ("fp8", True, True)
    assert config.sampler == stage_config("4").sampler
    assert restrict_stage(stage_config("0")) == (stage_config("0"), [])
    config, notes = restrict_stage(stage_config("4:lowvram=on:fbc=off:attention=sdpa"))
    assert notes == [LOW_VRAM_OFF] and not config.low_vram


@pytest.mark.parametrize("command", ["infer", "compare"])
def test_more_gpus_than_the_host_has_is_refused(command, tmp_path, image_file):
    """This machine's PyTorch sees no CUDA GPU: any --gpus N > 1 on cuda (or auto) names N and 0."""
    if torch.cuda.device_count() > 0:
        pytest.skip("this machine has CUDA GPUs; the refusal is tested where there are none")
    args = {
        "infer": ["infer", "--model", "tiny", "--image", str(image_file), "--prompt", "x", "--out",
                  str(tmp_path / "e.png")],
        "compare": ["compare", "--model", "tiny", "--stages", "0", "--report", str(tmp_path / "r")],
    }[command]  # fmt: skip
    for device in ("cuda", "auto"):
        line = one_error_line(run_cli(*args, "--gpus", "2", "--device", device))
        assert "--gpus 2 asks for 2 GPUs but this host has 0 CUDA GPU(s)" in line
    assert not (tmp_path / "e.png").exists() and not (tmp_path / "r").exists()


def test_bad_gpus_values_are_refused(tmp_path, image_file):
    infer = ["infer", "--image", str(image_file), "--prompt", "x", "--out", str(tmp_path / "e.png")]
    assert "--gpus is 0, expected an integer >= 1" in one_error_line(run_cli(*infer, "--model", "tiny", "--gpus", "0"))
    line = one_error_line(run_cli(*infer, "--engines", str(tmp_path), "--gpus", "2"))
    assert "--gpus 2 with --engines" in line
    line = one_error_line(run_cli("compare", "--model", "tiny", "--engines", str(tmp_path), "--gpus", "2",
                                  "--report", str(tmp_path / "r")))  # fmt: skip
    assert "--gpus 2 with --engines" in line
    line = one_error_line(run_cli(*infer, "--model", "tiny", "--low-vram", "--gpus", "2"))
    assert "--low-vram with --gpus 2" in line


def test_missing_context_parallelism_names_the_install(monkeypatch, tmp_path, image_file):
    monkeypatch.setitem(sys.modules, "diffusers.hooks", None)  # what an import of an older diffusers would find
    line = one_error_line(run_cli("infer", "--model", "tiny", "--image", str(image_file), "--prompt", "x", "--out",
                                  str(tmp_path / "e.png"), "--device", "cpu", "--gpus", "2"))  # fmt: skip
    assert "--gpus needs the Python package 'diffusers" in line and "pip install 'diffusers==0.42.1'" in line


def test_a_worker_that_dies_is_named_with_its_exit_code(tmp_path):
    """No fluxtrt error to print: the parent names the process, its exit code and where its output went."""
    from fluxtrt.parallel.launch import launch

    script = tmp_path / "exit.py"
    script.write_text("import os, sys\nprint('rank 1 was here')\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    with pytest.raises(FluxtrtError, match=r"process 1 of 2 stopped \(exit code 3\): its output is in (\S+)") as info:
        launch(2, [], script=str(script))
    logs = Path(str(info.value).split("its output is in ")[1].split(";")[0])
    assert any("rank 1 was here" in p.read_text() for p in logs.rglob("stdout.log"))


def test_record_worker_error_only_in_a_launched_worker(monkeypatch, tmp_path):
    from fluxtrt.parallel.launch import LAUNCH_DIR_ENV, record_worker_error

    for key in ("RANK", "TORCHELASTIC_RUN_ID", LAUNCH_DIR_ENV):
        monkeypatch.delenv(key, raising=False)
    assert record_worker_error("x") is False
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r")
    monkeypatch.setenv(LAUNCH_DIR_ENV, str(tmp_path))
    assert record_worker_error("first line\nsecond") is True
    assert (tmp_path / "error-rank1.txt").read_text() == "first line"
