"""The first-block cache on engines: the transformer built as two parts (``fluxtrt build --first-block-cache``), run by
the same rule as the PyTorch stages (``fluxtrt.pipeline.first_block_cache``).

Truths: the parts chained equal the monolithic transformer, and a skipped step's prediction with the exact rest
residual is the transformer's output (the tiny model in PyTorch and as ONNX Runtime engines); a cached engine edit
skips the very steps the cached PyTorch edit skips and ends on its latents; with threshold 0 the split engines' edit
is the monolithic engine's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fluxtrt.config import SamplerConfig
from fluxtrt.specs import Resolution
from fluxtrt.specs.flux import COMPONENTS, TRANSFORMER_PARTS
from tests.conftest import make_image, one_error_line, ort_config, run_cli

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SAMPLER = SamplerConfig("dpmpp-2m", steps=5)
SIZE = 256  # the target's sides: the ORT engines' smallest; the reference keeps its own size (not its ~1 MP one)
EDIT = {"sampler": SAMPLER, "height": SIZE, "width": SIZE, "max_area": SIZE * SIZE, "auto_resize": False}
MAX = Resolution(512, 512)  # the parts' largest size


@pytest.fixture(scope="module")
def fbc_engines(ort_engines, tmp_path_factory) -> Path:
    """The session's ONNX Runtime engines plus the transformer's two parts, built into a copy for sizes up to 512x512
    (the directory's range from then on: an edit's ~1 MP reference is made 512x512)."""
    from fluxtrt.engines.build import build_engines
    from fluxtrt.engines.manifest import Manifest

    out = tmp_path_factory.mktemp("fbc") / "tiny-ort-fbc"
    shutil.copytree(ort_engines, out)
    report = build_engines(ort_config(out, first_block_cache=True, components=("transformer",),
                                      opt_resolution=Resolution(SIZE, SIZE), max_resolution=MAX))  # fmt: skip
    assert [(r.name, r.status) for r in report.results] == [(p, "built") for p in TRANSFORMER_PARTS]
    assert set(Manifest.load(out).components) == {*COMPONENTS, *TRANSFORMER_PARTS}
    return out


def torch_cached_edit(tiny, threshold):
    """The tiny model's edit in PyTorch with the stages' first-block cache; returns (result, stats)."""
    from fluxtrt.backends.torch_runner import torch_runners
    from fluxtrt.pipeline.kontext import KontextPipeline
    from fluxtrt.stages.cache import FirstBlockCacheRunner

    runners = torch_runners(tiny)
    cached = FirstBlockCacheRunner(runners["transformer"].spec, tiny.transformer, threshold, torch.float32)
    runners["transformer"] = cached
    result = KontextPipeline.from_components(tiny, runners).edit(make_image(SIZE, SIZE), "p", **EDIT)
    return result, cached.stats()


def engine_edit(path, threshold):
    from fluxtrt.engines.load import load_engine_pipeline

    with load_engine_pipeline(path, "cpu", threshold) as pipeline:
        transformer = pipeline.runners["transformer"]
        result = pipeline.edit(make_image(SIZE, SIZE), "p", **EDIT)
        return result, transformer


@pytest.fixture(scope="module")
def zero_edit(fbc_engines):
    """The split engines' edit at threshold 0: every step computed, and the residual changes each step saw."""
    return engine_edit(fbc_engines, 0.0)


def test_parts_chained_equal_the_monolithic_transformer(tiny, fbc_engines):
    """In PyTorch and as ONNX Runtime engines: first -> rest gives the transformer's noise_pred; the first part's
    cached_pred, given the exact rest residual, gives it too (what a skipped step returns when nothing changed)."""
    from fluxtrt.backends.torch_modules import component_module
    from fluxtrt.engines.load import load_engine_pipeline

    with load_engine_pipeline(fbc_engines, "cpu", 0.0) as pipeline:
        split = pipeline.runners["transformer"]
        feed = split.spec.sample_feed({"B": 2, "S": 600}, torch.float32, seed=5)
        with torch.inference_mode():
            want = component_module("transformer", tiny)(*(feed[n] for n in split.spec.input_names))
        torch_parts = [component_module(p, tiny) for p in TRANSFORMER_PARTS]
        for kind, (first, rest) in (("torch", torch_parts), ("onnxruntime", (split.first, split.rest))):
            run_first = first.infer if kind == "onnxruntime" else lambda f, m=first: _call(m, f, split.first.spec)
            run_rest = rest.infer if kind == "onnxruntime" else lambda f, m=rest: _call(m, f, split.rest.spec)
            zeros = torch.zeros(2, 600, split.first.spec.outputs[0].shape[-1])
            one = run_first({**feed, "rest_residual": zeros})
            two = run_rest({n: one[n] if n in one else feed[n] for n in split.rest.spec.input_names})
            torch.testing.assert_close(two["noise_pred"], want, rtol=1e-4, atol=1e-4, msg=kind)
            again = run_first({**feed, "rest_residual": two["rest_residual"]})
            torch.testing.assert_close(again["cached_pred"], want, rtol=1e-4, atol=1e-4, msg=kind)
            assert not torch.allclose(one["cached_pred"], want, atol=1e-2)  # the residual matters


def _call(module, feed, spec):
    with torch.inference_mode():
        return dict(zip(spec.output_names, module(*(feed[n] for n in spec.input_names)), strict=True))


def test_cached_engine_edit_skips_the_steps_pytorch_skips(tiny, fbc_engines, zero_edit):
    """A threshold at the median of the steps' residual changes: some steps skip. The ONNX Runtime engines see the
    same changes, take the same decisions and end on the same latents as the PyTorch edit."""
    changes = sorted(zero_edit[1].stats().changes)  # what each step saw while every step computed
    threshold = (changes[len(changes) // 2 - 1] + changes[len(changes) // 2]) / 2
    want, want_stats = torch_cached_edit(tiny, threshold)
    got, runner = engine_edit(fbc_engines, threshold)
    stats = runner.stats()
    assert 1 <= want_stats.skipped < SAMPLER.num_steps
    assert (stats.computed, stats.skipped) == (want_stats.computed, want_stats.skipped)
    assert stats.changes == pytest.approx(want_stats.changes, rel=1e-3)
    assert min(abs(c - threshold) for c in want_stats.changes) > 1e-3  # no decision is a near tie
    torch.testing.assert_close(got.latents, want.latents, rtol=1e-3, atol=1e-3)
    assert len(stats.computed_ms) == stats.computed and len(stats.skipped_ms) == stats.skipped


def test_threshold_zero_split_edit_equals_the_monolithic_engine(fbc_engines, zero_edit):
    from fluxtrt.pipeline.first_block_cache import SplitTransformerRunner

    split, runner = zero_edit
    assert isinstance(runner, SplitTransformerRunner)
    assert (runner.stats().computed, runner.stats().skipped) == (SAMPLER.num_steps, 0)
    mono, plain = engine_edit(fbc_engines, None)  # off: the directory's one transformer engine
    assert not isinstance(plain, SplitTransformerRunner)
    torch.testing.assert_close(split.latents, mono.latents, rtol=1e-4, atol=1e-4)


def test_infer_reports_the_cache_and_refuses_a_threshold_for_engines_without_parts(fbc_engines, ort_engines, tmp_path):
    image = tmp_path / "in.png"
    make_image(SIZE, SIZE).save(image)
    common = [
        "--image",
        str(image),
        "--prompt",
        "p",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--height",
        "256",
        "--width",
        "256",
    ]
    result = run_cli("infer", "--engines", str(fbc_engines), "--fbc", "1e9", "--out", str(tmp_path / "a.png"), *common)
    assert result.exit_code == 0, result.stderr
    assert "first-block cache (threshold 1e+09): 1 steps computed, 2 skipped" in result.stdout
    result = run_cli("infer", "--engines", str(ort_engines), "--fbc", "0.1", "--out", str(tmp_path / "b.png"), *common)
    assert "holds no transformer parts" in one_error_line(result) and not (tmp_path / "b.png").exists()
    result = run_cli("infer", "--engines", str(fbc_engines), "--fbc", "-1", "--out", str(tmp_path / "c.png"), *common)
    assert "--fbc is '-1'" in one_error_line(result)


def test_compare_reports_cache_counts_for_engines(fbc_engines, tmp_path):
    from fluxtrt.bench.compare import compare
    from fluxtrt.bench.config import CompareConfig
    from fluxtrt.bench.contenders import EngineContender

    config = CompareConfig(model="tiny", stages=(), engines=(fbc_engines,), report_dir=tmp_path / "r", runs=1,
                           warmup=0, device="cpu", dtype="fp32", engines_fbc="1e9",
                           resolution=Resolution(SIZE, SIZE))  # fmt: skip
    sampler = SamplerConfig("dpmpp-2m", steps=3)
    contender = EngineContender(fbc_engines, sampler=sampler, first_block_cache=config.engines_fbc_threshold)
    row = compare(config, contenders=[contender]).contenders[0]
    assert row.status == "ok", row.error
    cache = row.runs[0].cache
    assert (cache["computed"], cache["skipped"]) == (1, 2) and cache["mean_skipped_ms"] > 0
    assert row.details["first_block_cache"] == 1e9
    assert "first-block cache" in (tmp_path / "r" / "report.md").read_text()


def test_aotinductor_parts_follow_the_pytorch_cache(tiny, aoti_engines):
    """The split AOTInductor engines of the tiny model under the cache rule, fed a sequence of steps: the same
    decisions and outputs as the PyTorch first-block cache on the same feeds."""
    from fluxtrt.pipeline.first_block_cache import SplitTransformerRunner
    from fluxtrt.stages.cache import FirstBlockCacheRunner

    spec = aoti_engines.specs["transformer"]
    feed = spec.sample_feed({"B": 1, "S": 48}, torch.float32, seed=3)
    steps = (1.0, 0.99, 0.98, 0.6, 0.59, 0.2)

    def run(runner):
        outs = [runner.infer({**feed, "timestep": torch.tensor([t])})["noise_pred"] for t in steps]
        return outs, runner.stats()

    _, probe = run(FirstBlockCacheRunner(spec, tiny.transformer, 0.0, torch.float32))
    changes = sorted(probe.changes)
    threshold = (changes[1] + changes[2]) / 2
    want, want_stats = run(FirstBlockCacheRunner(spec, tiny.transformer, threshold, torch.float32))
    engines = SplitTransformerRunner(spec, *(aoti_engines[p] for p in TRANSFORMER_PARTS), threshold)
    got, stats = run(engines)
    assert 1 <= want_stats.skipped < len(steps)
    assert (stats.computed, stats.skipped) == (want_stats.computed, want_stats.skipped)
    assert stats.changes == pytest.approx(want_stats.changes, rel=1e-3)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
