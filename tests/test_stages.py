"""The PyTorch stages: the table composes, overrides parse, the first-block cache counts right, the FP8 attention
processor matches diffusers' on emulated FP8, regional compilation equals eager, and CUDA-only features say so."""

from __future__ import annotations

import time

import pytest
import torch

from fluxtrt.config import SamplerConfig
from fluxtrt.errors import DeviceError, InputError
from fluxtrt.stages import STAGES, StageConfig, stage_config

ORDER = ("0", "1", "2", "3", "4", "4f", "4k")
FIELDS = ("compile", "fuse_qkv", "compile_vae", "first_block_cache", "attention", "quant", "sampler")


def changed(a: StageConfig, b: StageConfig) -> set[str]:
    return {f for f in FIELDS if getattr(a, f) != getattr(b, f)}


def test_stage_table_is_design_4():
    """Each stage includes the previous one's features and adds exactly what its table row says."""
    assert tuple(STAGES) == ORDER
    s = STAGES
    assert s["0"].features() == () and s["0"].sampler == SamplerConfig("euler", "flux-shift", 28)
    assert changed(s["0"], s["1"]) == {"compile", "fuse_qkv", "compile_vae", "first_block_cache"}
    assert s["1"].compile and s["1"].fuse_qkv and s["1"].compile_vae and s["1"].first_block_cache is not None
    assert changed(s["1"], s["2"]) == {"attention"} and s["2"].attention == "fp8"
    assert changed(s["2"], s["3"]) == {"quant"} and s["3"].quant == "fp8"
    assert changed(s["3"], s["4"]) == {"sampler"} and s["4"].sampler == SamplerConfig("dpmpp-2m", "log-snr", 14)
    assert changed(s["4"], s["4f"]) == {"sampler"} and s["4f"].sampler == SamplerConfig("dpmpp-2m", "flux-shift", 14)
    assert changed(s["4"], s["4k"]) == {"sampler"} and s["4k"].sampler == SamplerConfig("dpmpp-2m", "karras", 14)
    for prev, cur in zip(ORDER, ORDER[1:], strict=False):
        assert s[cur].includes(s[prev]), (prev, cur)
        assert set(s[prev].features()) <= set(s[cur].features())
    for prev, cur in (("0", "1"), ("1", "2"), ("2", "3")):
        assert not s[prev].includes(s[cur])


def test_stage_spec_overrides():
    c = stage_config("1:fbc=off")
    assert c.name == "1:fbc=off" and c.base == "1" and c.first_block_cache is None and c.compile
    assert stage_config("3:quant=fp4").quant == "fp4"
    assert stage_config("4:steps=8").sampler == SamplerConfig("dpmpp-2m", "log-snr", 8)
    off = stage_config("4:compile=off")
    assert not off.compile and not off.compile_vae and off.fuse_qkv and off.attention == "fp8"
    assert stage_config("1:compile=aot_eager").compile_backend == "aot_eager"
    assert stage_config("4k:fbc=0.2:sigmas=flux-shift").sampler.sigmas == "flux-shift"
    assert stage_config("4f:sigmas=log-snr").sampler == STAGES["4"].sampler
    for bad in ("5", "1:foo=bar", "1:fbc=x", "1:steps=0", "2:attention=fp4", "3:quant=int4", "1:fbc", "4:solver=ddim"):
        with pytest.raises(InputError):
            stage_config(bad)


# --- first-block cache ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformer_parts(tiny):
    from fluxtrt.backends.torch_runner import torch_runners

    runner = torch_runners(tiny)["transformer"]
    feed = runner.spec.sample_feed({"B": 1, "S": 48}, torch.float32, seed=3)
    return tiny.transformer, runner, feed


def run_steps(runner, feed, timesteps):
    outs = []
    for t in timesteps:
        outs.append(runner.infer({**feed, "timestep": torch.tensor([t])})["noise_pred"])
    return outs


def test_first_block_cache_threshold_zero_computes_every_step_and_equals_plain(transformer_parts):
    from fluxtrt.stages.cache import FirstBlockCacheRunner

    transformer, plain, feed = transformer_parts
    cached = FirstBlockCacheRunner(plain.spec, transformer, 0.0, torch.float32)
    steps = [1.0, 0.8, 0.6, 0.4, 0.2]
    got, want = run_steps(cached, feed, steps), run_steps(plain, feed, steps)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    stats = cached.stats()
    assert (stats.computed, stats.skipped) == (5, 0)
    assert len(stats.computed_ms) == 5 and all(ms > 0 for ms in stats.computed_ms)
    assert stats.mean_skipped_ms is None


def test_first_block_cache_huge_threshold_skips_all_but_first(transformer_parts):
    from fluxtrt.stages.cache import FirstBlockCacheRunner

    transformer, plain, feed = transformer_parts
    cached = FirstBlockCacheRunner(plain.spec, transformer, 1e9, torch.float32)
    outs = run_steps(cached, feed, [1.0, 0.75, 0.5, 0.25])
    stats = cached.stats()
    assert (stats.computed, stats.skipped) == (1, 3)
    assert len(stats.skipped_ms) == 3 and stats.mean_skipped_ms > 0
    # The first step is exact; a skipped step is the first block's output plus the cached residual, not a copy.
    torch.testing.assert_close(outs[0], run_steps(plain, feed, [1.0])[0], rtol=0, atol=1e-6)
    assert not torch.equal(outs[1], outs[0])
    # A rising timestep starts a new edit: the cache and the counts reset.
    run_steps(cached, feed, [1.0, 0.5])
    stats = cached.stats()
    assert (stats.computed, stats.skipped) == (1, 1)


def test_first_block_cache_counts_follow_the_residual_change(transformer_parts):
    """With a threshold between the observed changes, exactly the steps whose change is below it skip."""
    from fluxtrt.stages.cache import FirstBlockCacheRunner

    transformer, plain, feed = transformer_parts
    steps = (1.0, 0.99, 0.5)  # a tiny step, then a large one
    probe = FirstBlockCacheRunner(plain.spec, transformer, 0.0, torch.float32)
    run_steps(probe, feed, steps)
    small, large = probe.stats().changes
    assert 0 < small < large
    cached = FirstBlockCacheRunner(plain.spec, transformer, (small + large) / 2, torch.float32)
    run_steps(cached, feed, steps)
    stats = cached.stats()
    # Step 2 moved less than the threshold from step 1: skipped. Step 3 is compared with step 1 (the last computed),
    # which it moved even further from: computed.
    assert (stats.computed, stats.skipped) == (2, 1)
    assert stats.changes[0] == pytest.approx(small) and stats.changes[1] > large


# --- FP8 attention processor ------------------------------------------------------------------------------------


def fresh_transformer(num_layers: int = 1, num_single_layers: int = 1):
    from diffusers import FluxTransformer2DModel

    from fluxtrt.models.synthetic import TINY

    torch.manual_seed(0)
    config = {**TINY.transformer, "num_layers": num_layers, "num_single_layers": num_single_layers}
    return FluxTransformer2DModel(**config).eval().requires_grad_(False)


def transformer_feed(model, tokens: int = 40, text: int = 8):
    gen = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, tokens, 64, generator=gen),
        "encoder_hidden_states": torch.randn(1, text, model.config.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(1, model.config.pooled_projection_dim, generator=gen),
        "timestep": torch.tensor([0.6]),
        "guidance": torch.tensor([2.5]),
        "img_ids": torch.randint(0, 8, (tokens, 3), generator=gen).float(),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


def test_quantize_fp8_round_trip():
    from fluxtrt.kernels.fp8 import FP8_MAX, quantize_fp8_dynamic

    x = torch.randn(2, 64, 4, 16) * 3
    x8, descale = quantize_fp8_dynamic(x)
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == (1, 1, 1, 1)
    assert x8.float().abs().max().item() == FP8_MAX  # the largest magnitude maps to e4m3's largest finite value
    err = (x8.float() * descale - x).abs().max() / x.abs().max()
    assert err < 2**-4  # e4m3 keeps 3 mantissa bits


def test_fp8_processor_matches_diffusers_processor_on_emulated_fp8():
    """Same projections, norms, RoPE and output split as FluxAttnProcessor; only the FP8 rounding differs."""
    from fluxtrt.kernels.attention import Fp8FluxAttnProcessor
    from fluxtrt.kernels.attention_ops import EmulatedFp8Kernel

    model = fresh_transformer()
    feed = transformer_feed(model)
    with torch.inference_mode():
        want = model(**feed)[0]
        model.set_attn_processor(Fp8FluxAttnProcessor(EmulatedFp8Kernel()))
        got = model(**feed)[0]
        model.fuse_qkv_projections()
        got_fused = model(**feed)[0]
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    assert cosine > 0.995, cosine
    assert not torch.equal(got, want)  # the FP8 path ran
    torch.testing.assert_close(got_fused, got, rtol=1e-4, atol=1e-4)


def test_fp8_kernel_unavailable_on_cpu():
    from fluxtrt.kernels.attention import fp8_attention_kernel

    with pytest.raises(DeviceError, match="unavailable on cpu"):
        fp8_attention_kernel("cpu")


# --- applying stages --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mutable_tiny():
    """A tiny model of this module's own: applying stages modifies it in place."""
    from fluxtrt.models import load_components

    return load_components("tiny", "cpu", "fp32", seed=0)


def test_cuda_features_report_unavailable_on_cpu(mutable_tiny):
    from fluxtrt.stages.apply import StagedModel

    staged = StagedModel(mutable_tiny)
    applied = staged.apply(stage_config("3:compile=off:fbc=off"))
    report = applied.report
    assert len(report.unavailable) == 2
    assert all("unavailable on cpu" in u for u in report.unavailable)
    assert report.features == ["fused QKV"]
    assert report.attention.startswith("torch SDPA") and "not quantized" in report.quant
    with pytest.raises(DeviceError, match="unavailable on cpu"):
        staged.apply(stage_config("2:compile=off"), strict=True)
    with pytest.raises(DeviceError):  # fp4 is never silently dropped
        staged.apply(stage_config("3:quant=fp4:compile=off"))


def test_stage1_compiles_regionally_and_matches_eager(mutable_tiny):
    """Stage 1 (aot_eager backend: dynamo captures each repeated block as one graph, fullgraph) equals eager, the
    compile time is measured apart, and a stage that would need undoing the compile is refused."""
    from fluxtrt.stages.apply import StagedModel

    staged = StagedModel(mutable_tiny)
    eager = staged.apply(stage_config("0")).runners
    spec = eager["transformer"].spec
    feed = spec.sample_feed({"B": 1, "S": 48}, torch.float32, seed=5)
    latent = torch.randn(1, 16, 8, 8)
    want_t = eager["transformer"].infer(feed)["noise_pred"]
    want_d = eager["vae_decoder"].infer({"latent": latent})["image"]

    applied = staged.apply(stage_config("1:compile=aot_eager:fbc=off"))
    assert applied.report.features == [
        "regional compile (aot_eager)",
        "fused QKV",
        "channels-last VAE, compiled decode",
    ]
    runners = applied.runners
    steady = {}
    for _ in range(2):
        t0 = time.perf_counter()
        got_t = runners["transformer"].infer(feed)["noise_pred"]
        t1 = time.perf_counter()
        got_d = runners["vae_decoder"].infer({"latent": latent})["image"]
        steady = {"transformer": (t1 - t0) * 1e3, "vae_decoder": (time.perf_counter() - t1) * 1e3}
    torch.testing.assert_close(got_t, want_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_d, want_d, rtol=1e-4, atol=1e-5)
    assert all(b._compiled_call_impl is not None for b in mutable_tiny.transformer.transformer_blocks)
    applied.end_edit()  # a warmup edit: first calls known, no steady time yet
    assert set(applied.report.first_call_ms) == {"transformer", "vae_decoder"} and applied.report.compile_s is None
    applied.end_edit(steady, {"transformer": 1, "vae_decoder": 1})
    first = applied.report.first_call_ms
    want_s = sum(first[n] - steady[n] for n in steady) / 1e3
    assert applied.report.compile_s == pytest.approx(want_s) and applied.report.compile_s > 0

    assert staged.can_apply(stage_config("0")) is not None
    with pytest.raises(InputError, match="load the model again"):
        staged.apply(stage_config("0"))
    # Stage 1 with the cache composes with what is applied: no reload, no new compile of the blocks.
    cached = staged.apply(stage_config("1:compile=aot_eager"))
    assert cached.cache_runner is not None and "first-block cache 0.08" in cached.report.features


@pytest.mark.slow
def test_regional_inductor_compile_equals_eager_on_one_block():
    """The real stage-1 compile (inductor) of a one-double-block transformer equals eager within float tolerance."""
    model = fresh_transformer(num_layers=1, num_single_layers=0)
    feed = transformer_feed(model)
    with torch.inference_mode():
        want = model(**feed)[0]
        model.fuse_qkv_projections()
        model.compile_repeated_blocks(fullgraph=True, backend="inductor")
        got = model(**feed)[0]
    assert model.transformer_blocks[0]._compiled_call_impl is not None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_stage_report_serialises():
    import json

    from fluxtrt.stages.apply import StageReport
    from fluxtrt.stages.cache import CacheStats

    report = StageReport("1", ["fused QKV"], [], "euler/flux-shift/28", "sdpa", "none", "off", 0.1)
    report.cache = CacheStats(2, 1, [10.0, 12.0], [3.0])
    data = json.loads(json.dumps(report.to_dict()))
    assert data["cache"] == {"computed": 2, "skipped": 1, "mean_computed_ms": 11.0, "mean_skipped_ms": 3.0}
    assert data["features"] == ["fused QKV"] and data["compile_s"] is None


def test_bf16_diffusers_transformer_rounds_timestep_and_guidance():
    """Why compiled engines sit nearer FP32 than eager BF16 (benchmarks/results/README.md): in BF16, diffusers'
    FLUX transformer rounds ``timestep * 1000`` and ``guidance * 1000`` to BF16, which moves every block's
    modulation. Where both products are exact in BF16 the eager BF16 output is 10x nearer its FP32 result."""
    import copy

    from fluxtrt.backends.torch_modules import TransformerModule
    from fluxtrt.models import load_components
    from fluxtrt.specs import Resolution, component_specs
    from fluxtrt.specs.flux import component_dims, dims_from_components

    bf16 = load_components("tiny", "cpu", "bf16")
    dims = dims_from_components(bf16)
    spec = component_specs(dims)["transformer"]
    feed = spec.sample_feed(component_dims("transformer", dims, 1, Resolution(128, 128), Resolution(128, 128)),
                            torch.bfloat16, seed=0)  # fmt: skip
    model = TransformerModule(bf16.transformer)
    model32 = TransformerModule(copy.deepcopy(bf16.transformer).float())  # the same weights, computed in FP32

    def error(t: float, g: float) -> float:
        f = {**feed, "timestep": torch.full_like(feed["timestep"], t), "guidance": torch.full_like(feed["guidance"], g)}
        with torch.inference_mode():
            ref = model32(**{k: v.float() if v.is_floating_point() else v for k, v in f.items()})
            out = model(**f).float()
        return ((out - ref).norm() / ref.norm()).item()

    assert torch.tensor(0.7).bfloat16() * 1000 == 700 and torch.tensor(2.5).bfloat16() * 1000 == 2496
    exact, rounded = error(0.5, 2.0), error(0.7, 2.5)  # 500 and 2000 are BF16 numbers
    assert rounded > 5 * exact, (exact, rounded)
