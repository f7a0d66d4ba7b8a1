"""The GPU tier: every CUDA code path of fluxtrt against an oracle, run as a user runs it (``pytest -m gpu`` on a GPU
machine; ``scripts/gpu_tests.sh`` runs it there in one call).

What each test holds against:
- the FP8 attention kernels: exact attention computed in float64 on the same (dequantized) Q, K, V;
- stages 0-4 (tiny, and a model of FLUX.1-Kontext's full widths with two blocks of each kind, so that the real kernel
  shapes run): stage 0's edit in the same run (latent cosine), as ``compare`` reports it;
- AOTInductor bf16 and fp8 engines, built on CUDA and loaded by ``compare`` in a fresh process: their own PyTorch
  module in FP32, step by step (``step_error``), and stage 0's edit;
- CUDA-graph replay: the same package called without graphs, bit for bit;
- first-block-cache engines: the same engines with the cache off;
- the 24 GB mode and the slim VAE: the plain edit of the same model;
- ``--gpus 2``: the edit of one GPU (skipped, naming the reason, on a machine with one GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; PyTorch sees none here"),
]

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "input.png"
# Engines of the tiny model for 256x256 edits (what the tests edit): one size compiles fastest.
RANGE = ["--min-resolution", "256x256", "--opt-resolution", "256x256", "--max-resolution", "256x256"]
# A build or a compare on the GPU: minutes of inductor compiles at most.
TIMEOUT_S = 600


def fluxtrt(*args: str) -> subprocess.CompletedProcess:
    """``python -m fluxtrt ARGS`` in a fresh process; a failure shows its output."""
    proc = subprocess.run([sys.executable, "-m", "fluxtrt", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=TIMEOUT_S, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert proc.returncode == 0, f"fluxtrt {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def sm() -> int:
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def needs_fp8():
    if sm() < 89:
        pytest.skip(f"FP8 needs compute capability 8.9 or newer; this GPU has {sm() / 10:.1f}")


def contenders(report_dir: Path) -> dict[str, dict]:
    report = json.loads((report_dir / "report.json").read_text())
    return {c["contender"]: c for c in report["contenders"]}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --- kernels ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [512 + 1024, 512 + 8192])  # 256x256 and 1024x1024 edits with a reference
def test_fp8_attention_kernel_matches_exact_attention_at_fluxs_shapes(tokens):
    """The kernel the FP8 paths pick (FlashAttention 3 or cuDNN's FP8 SDPA) against float64 attention on the very
    Q, K, V it was given (dequantized): what is left is the kernel's own FP8 rounding of P and its accumulation."""
    needs_fp8()
    from fluxtrt.kernels.attention import checked_fp8_attention_kernel
    from fluxtrt.kernels.fp8 import quantize_fp8_dynamic

    kernel = checked_fp8_attention_kernel("cuda")
    gen = torch.Generator(device="cpu").manual_seed(tokens)
    q, k, v = (torch.randn(1, tokens, 24, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    scale = 128**-0.5
    with torch.inference_mode():
        (q8, dq), (k8, dk), (v8, dv) = (quantize_fp8_dynamic(t) for t in (q, k, v))
        out = kernel(q8, k8, v8, dq, dk, dv, scale).double()
        exact = [t.double() * d.double() for t, d in ((q8, dq), (k8, dk), (v8, dv))]
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in exact), scale=scale)
        ref = ref.transpose(1, 2)
    assert out.shape == ref.shape == (1, tokens, 24, 128) and torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    # FP8 (e4m3, 3 mantissa bits) P and O: a few percent; a wrong layout or scale gives about 100%.
    assert rel < 0.06, f"{kernel.name}: relative error {rel:.4f}"


# --- stages -----------------------------------------------------------------------------------------------------------


def test_stages_0_to_4_of_the_tiny_model_on_cuda(tmp_path):
    """Every stage runs on CUDA and edits what stage 0 edits: the 28-step stages to bf16/FP8 rounding, stage 4 (a
    different 14-step sampler of the same flow) close to it; stage 2 and 3 run FP8 attention, stage 3 FP8 linears."""
    needs_fp8()
    fluxtrt("compare", "--model", "tiny", "--device", "cuda", "--stages", "0,1,2,3,4", "--resolution", "256x256",
            "--runs", "1", "--warmup", "0", "--report", str(tmp_path / "cmp"))  # fmt: skip
    got = contenders(tmp_path / "cmp")
    assert set(got) == {"0", "1", "2", "3", "4"} and all(c["status"] == "ok" for c in got.values()), got
    for name in ("1", "2", "3"):
        assert got[name]["steps"] == 28 and got[name]["latent_cosine"] > 0.999, (name, got[name]["latent_cosine"])
    assert got["4"]["steps"] == 14 and got["4"]["latent_cosine"] > 0.99
    for name in ("2", "3", "4"):
        assert "fp8" in got[name]["details"]["attention"], got[name]["details"]["attention"]
    assert "Float8" in got["3"]["details"]["quant"] and got["1"]["details"]["compile"] != "off"


def test_stages_at_full_width_run_the_real_kernel_shapes(tmp_path):
    """FLUX.1-Kontext's widths (24 heads x 128, 3072 hidden, T5-XXL, CLIP-L, the 16-channel VAE) with two blocks of
    each kind, 1024x1024 with a 1024x1024 reference (8192 + 512 tokens): the FP8 attention and torchao's FP8 linears
    at the shapes the real checkpoint runs, against stage 0 of the same model."""
    needs_fp8()
    fluxtrt("compare", "--model", "random-full-2blocks", "--device", "cuda", "--stages", "0,2,3:compile=off",
            "--resolution", "1024x1024", "--runs", "1", "--warmup", "0", "--report", str(tmp_path / "cmp"))  # fmt: skip
    got = contenders(tmp_path / "cmp")
    assert all(c["status"] == "ok" for c in got.values()), got
    assert got["2"]["latent_cosine"] > 0.99 and got["3:compile=off"]["latent_cosine"] > 0.99, got
    assert "Float8" in got["3:compile=off"]["details"]["quant"]


# --- engines ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Path]:
    """Tiny AOTInductor engines built on CUDA: fp8 (calibrated, FP8 attention, CUDA-graph replay of the transformer,
    weights beside the packages so that LoRAs can replace them) and bf16 with the transformer in two parts for the
    first-block cache. The two builds run side by side (each compile is mostly single-threaded host work). The fp8
    build counts its tiny transformer as a full-size one: the build process builds it on CUDA from the model it
    calibrated, the rest of that model freed, while workers build the other components."""
    needs_fp8()
    root = tmp_path_factory.mktemp("gpu-engines")
    common = ["--model", "tiny", "--backend", "aotinductor", "--device", "cuda", *RANGE]
    builds = {
        "fp8": [
            *common,
            "--precision",
            "fp8",
            "--cuda-graph",
            "--calibration-edits",
            "1",
            "--aoti-weights",
            "external",
        ],
        "bf16-fbc": [*common, "--precision", "bf16", "--first-block-cache"],
    }
    # fluxtrt's command; for fp8 with the tiny transformer counted as a large one (fluxtrt.engines.jobs).
    here = "import sys, fluxtrt.engines.jobs as j, fluxtrt.cli as c; j.BUILD_HERE_FROM = 0; c.main(sys.argv[1:])"
    command = {"fp8": ["-c", here], "bf16-fbc": ["-m", "fluxtrt"]}
    procs = {
        name: subprocess.Popen(
            [sys.executable, *command[name], "build", *args, "--out", str(root / name)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        for name, args in builds.items()
    }
    logs = os.environ.get("FLUXTRT_GPU_TIER_LOGS")  # scripts/gpu_tests.sh keeps each build's output
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        if logs:
            (Path(logs) / f"build-{name}.log").write_text(out)
        assert proc.returncode == 0, f"fluxtrt build {' '.join(builds[name])} exited {proc.returncode}:\n{out}"
        built_here = "transformer: building in this process, from the model loaded here" in out
        assert built_here == (name == "fp8"), out
    return {name: root / name for name in builds}


def test_engines_match_their_pytorch_modules_step_by_step_in_compare(engines, tmp_path):
    """``compare --engines`` on CUDA loads each engine directory in its own process and runs every step's
    transformer call again in FP32 PyTorch: bf16 engines agree to bf16 rounding, fp8 ones to FP8's; both edit what
    stage 0 edits."""
    fluxtrt("compare", "--model", "tiny", "--device", "cuda", "--stages", "0", "--engines", str(engines["fp8"]),
            "--engines", str(engines["bf16-fbc"]), "--engines-fbc", "off", "--resolution", "256x256", "--runs", "1",
            "--warmup", "0", "--report", str(tmp_path / "cmp"))  # fmt: skip
    got = contenders(tmp_path / "cmp")
    fp8, bf16 = got["engines:fp8"], got["engines:bf16-fbc"]
    assert fp8["status"] == bf16["status"] == "ok", got
    for row, bound in ((bf16, 0.02), (fp8, 0.10)):
        error = row["details"]["step_error"]
        assert error["reference"] == "fp32" and len(error["rel_l2"]) == row["steps"] == 14
        assert error["max_rel_l2"] < bound, (row["contender"], error["max_rel_l2"])
        assert row["latent_cosine"] > 0.99, (row["contender"], row["latent_cosine"])


def test_external_weights_read_through_pinned_chunks_are_safetensors_own(tmp_path, monkeypatch):
    """The pinned reader of AOTInductor external weights on CUDA (chunks copied on a stream of their own) against
    ``safetensors``' ``load_file`` to the same device: every tensor bit for bit, with chunks small enough that tensors
    span several and both buffers are refilled many times (a copy that read a refilled buffer fails)."""
    from safetensors.torch import load_file, save_file

    from fluxtrt.backends.aotinductor import reading

    g = torch.Generator().manual_seed(0)
    weights = {f"w{i}": torch.randn(1000 + 37 * i, 129, generator=g).to(dtype)
               for i, dtype in enumerate([torch.bfloat16, torch.float8_e4m3fn, torch.float32] * 4)}  # fmt: skip
    weights["scalar"] = torch.tensor(2.5)
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    monkeypatch.setattr(reading, "CHUNK_BYTES", 100_003)
    got = reading.read_weights_pinned(path, torch.device("cuda"))
    want = load_file(str(path), device="cuda")
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].is_cuda and got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_cuda_graph_replay_gives_the_plain_calls_bit_for_bit(engines):
    """The fp8 transformer engine replays a captured graph per shape; the same package called directly, on the same
    inputs, must give the same bits (three different inputs, so a replay that reads stale buffers fails)."""
    from fluxtrt.backends.aotinductor.runtime import AotInductorRunner
    from fluxtrt.engines.load import load_engine_pipeline

    with load_engine_pipeline(engines["fp8"], "cuda") as pipeline:
        graphed = pipeline.runners["transformer"]
        assert graphed.cuda_graph
        plain = AotInductorRunner(graphed.spec, graphed.path, graphed.compute_dtype, graphed.device, graphed.ranges,
                                  external_weights=graphed.external_weights, cuda_graph=False)  # fmt: skip
        plain.load()
        try:
            # 256x256 with a 256x256 reference: 2 x 256 tokens; three seeds, so a replay that reads stale buffers fails.
            for seed in range(3):
                feed = graphed.spec.sample_feed({"B": 1, "S": 512}, graphed.compute_dtype, "cuda", seed=seed)
                want = plain.infer(feed)["noise_pred"].clone()
                got = graphed.infer(feed)["noise_pred"].clone()
                assert torch.isfinite(want).all() and torch.equal(got, want)
        finally:
            plain.close()


def test_a_cuda_engine_call_does_not_wait_on_the_host_for_the_previous_one(engines):
    """Behind a second of GPU work, two calls of a package loaded as the runner loads CUDA packages return at once;
    loaded thread-safe (torch's default), the second call waits on the host for the first to finish on the GPU."""
    import time

    from fluxtrt.backends.aotinductor.runtime import load_package, single_threaded
    from fluxtrt.engines.load import load_engine_pipeline
    from fluxtrt.specs import Resolution
    from fluxtrt.specs.flux import component_dims

    with load_engine_pipeline(engines["bf16-fbc"], "cuda") as pipeline:
        runner = pipeline.runners["vae_decoder"]
        size = Resolution(256, 256)
        feed = runner.spec.sample_feed(component_dims("vae_decoder", pipeline.dims, 1, size, size),
                                       runner.compute_dtype, "cuda")  # fmt: skip
        args = [feed[n] for n in runner.spec.input_names]
        assert single_threaded("cuda", cuda_graph=False) and not single_threaded("cpu", cuda_graph=False)
        host_s = {}
        with torch.inference_mode():
            for name, threaded in (("thread-safe", False), ("runner", single_threaded("cuda", cuda_graph=False))):
                model = load_package(runner.path, 0, run_single_threaded=threaded, probe_host_isa=False)
                model(*args)
                torch.cuda.synchronize()
                torch.cuda._sleep(2_000_000_000)  # about a second of the GPU spinning
                t0 = time.perf_counter()
                model(*args)
                model(*args)
                host_s[name] = time.perf_counter() - t0
                torch.cuda.synchronize()
    assert host_s["runner"] < 0.1 < 0.3 < host_s["thread-safe"], host_s


def test_lora_on_the_cuda_fp8_engine_matches_pytorch_with_it_fused_and_comes_off_exactly(engines, tiny, tmp_path):
    """A LoRA merged into the CUDA FP8 transformer engine (weights quantized again, CUDA graphs captured again):
    against the FP32 PyTorch transformer with the LoRA fused, within twice the engine's error without it, while the
    LoRA moves the output far more than that; A -> B -> A and removal give the earlier outputs bit for bit."""
    import copy

    from fluxtrt.backends.torch_modules import TransformerModule
    from fluxtrt.engines.load import load_engine_pipeline
    from fluxtrt.lora.engines import apply_to_runner
    from fluxtrt.lora.files import read_loras
    from fluxtrt.lora.fuse import fuse
    from tests.test_lora import HandedStorages, make_lora

    pytest.importorskip("peft")
    for name, seed in (("a", 1), ("b", 2)):
        make_lora(tiny.transformer, tmp_path / f"{name}.safetensors", seed)
    a, b = read_loras([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])

    def rel(x, y) -> float:
        return float((x - y).norm() / y.norm())

    with load_engine_pipeline(engines["fp8"], "cuda") as pipeline:
        runner = pipeline.runners["transformer"]
        assert runner.cuda_graph
        feed = runner.spec.sample_feed({"B": 1, "S": 512}, runner.compute_dtype, "cuda", seed=0)
        fp32 = {k: v.float() if v.is_floating_point() else v for k, v in feed.items()}

        def engine():
            return runner.infer(feed)["noise_pred"].float().clone()

        def oracle(chosen):
            model = copy.deepcopy(tiny.transformer).to("cuda", torch.float32)
            if chosen:
                fuse(model, chosen)
            with torch.no_grad():
                return TransformerModule(model)(**fp32).float()

        base = engine()
        error = rel(base, oracle([]))
        runner.model.loader = handed = HandedStorages(runner.model.loader)
        try:
            apply_to_runner(runner, [a])
            with_a = engine()
            assert rel(with_a, oracle([a])) <= 2 * error, (rel(with_a, oracle([a])), error)
            assert rel(with_a, base) > 5 * error
            apply_to_runner(runner, [b])
            assert not torch.equal(engine(), with_a)
            apply_to_runner(runner, [a])
            assert torch.equal(engine(), with_a)
        finally:
            apply_to_runner(runner, [])
            runner.model.loader = handed.loader
        assert torch.equal(engine(), base)
        # Each replaced constant went to the package in one GPU tensor, filled again at each swap (none is released).
        originals = {t.untyped_storage().data_ptr() for t in runner._constants.values()}
        assert len(handed.storages - originals) == len(runner._merged) > 0


def test_first_block_cache_engines_skip_steps_and_stay_close_to_the_uncached_edit(engines, tmp_path):
    """With the cache off, the two-part engines compute every step (the edit ``compare`` checked above); with a
    threshold they skip some steps and the edit stays close to the uncached one."""
    off, on = tmp_path / "off.png", tmp_path / "on.png"
    common = ["infer", "--engines", str(engines["bf16-fbc"]), "--image", str(IMAGE), "--prompt", "make it blue",
              "--height", "256", "--width", "256", "--device", "cuda"]  # fmt: skip
    fluxtrt(*common, "--fbc", "off", "--out", str(off))
    proc = fluxtrt(*common, "--fbc", "0.5", "--out", str(on))
    assert "skipped" in proc.stdout + proc.stderr
    assert psnr(pixels(off), pixels(on)) > 25


# --- the 24 GB mode, the slim VAE, --gpus --------------------------------------------------------------------------


def test_low_vram_mode_and_slim_vae_on_cuda_edit_what_the_plain_model_edits(tmp_path):
    """``--low-vram`` on CUDA quantizes the transformer's linears to FP8 as blocks reach the GPU and streams the text
    encoders from the host; with the slim VAE in both, the edit must stay close to the plain bf16 edit."""
    needs_fp8()
    plain, low = tmp_path / "plain.png", tmp_path / "low.png"
    common = ["infer", "--model", "tiny", "--image", str(IMAGE), "--prompt", "make it blue", "--height", "256",
              "--width", "256", "--device", "cuda", "--vae", "tiny"]  # fmt: skip
    fluxtrt(*common, "--out", str(plain))
    fluxtrt(*common, "--low-vram", "--out", str(low))
    a, b = pixels(plain), pixels(low)
    assert a.shape == b.shape == (1024, 1024, 3)  # an explicit size is fitted to 1 MP, as diffusers fits it (README)
    assert psnr(a, b) > 30


def test_two_gpus_give_the_edit_of_one(tmp_path):
    """``--gpus 2`` splits the transformer's sequence over two GPUs (Ulysses attention through diffusers); the edit
    must be the one GPU's edit to bf16 rounding."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs; this machine has {torch.cuda.device_count()}")
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    common = ["infer", "--model", "tiny", "--image", str(IMAGE), "--prompt", "make it blue", "--height", "256",
              "--width", "256", "--device", "cuda"]  # fmt: skip
    fluxtrt(*common, "--out", str(one))
    fluxtrt(*common, "--gpus", "2", "--out", str(two))
    assert psnr(pixels(one), pixels(two)) > 35
