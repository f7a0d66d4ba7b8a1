"""Refittable TensorRT plans (``fluxtrt build --refittable``) and LoRAs merged into them by TensorRT's refitter.

On this CPU-only machine: the option as declared once for both TensorRT backends (flag, settings, old manifests);
the refusals (FP8/FP4; TensorRT-RTX without a GPU, whose real refittable build is shown to fail here); the weight
mapping on the tiny transformer's real export: every linear of the PyTorch model maps to exactly one ONNX initializer,
holding that linear's weight, and TensorRT-RTX's parsed network takes each as a refittable weight; a plan built
without ``--refittable`` refusing a LoRA in one line. Loading and refitting a plan needs a GPU that TensorRT-RTX
runs on (or TensorRT 10 on any recent GPU): that test skips here with the reason.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fluxtrt.backends.tensorrt.flavour import TENSORRT_RTX
from fluxtrt.config import BuildConfig
from fluxtrt.errors import BuildError, InputError
from fluxtrt.specs import Resolution, component_specs
from tests import test_lora
from tests.conftest import one_error_line, run_cli

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install 'fluxtrt[tensorrt-rtx]')")
pytest.importorskip("onnxscript")

RANGE = {"min_resolution": Resolution(256, 256), "opt_resolution": Resolution(256, 256),
         "max_resolution": Resolution(512, 512)}  # fmt: skip
# The LoRA files of tests/test_lora.py, and PyTorch's latents with them fused (the oracle of the GPU test).
loras = test_lora.loras
torch_latents = test_lora.torch_latents


def build(out: Path, backend: str = "tensorrt-rtx", precision: str = "bf16", **kw):
    from fluxtrt.engines.build import build_engines

    return build_engines(BuildConfig(model="tiny", backend=backend, precision=precision, out=out, **RANGE, **kw))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """A bf16 TensorRT-RTX transformer built without --refittable (its ONNX is what a refittable build reads)."""
    root = tmp_path_factory.mktemp("refit") / "bf16"
    build(root, components=("transformer",))
    return root


def transformer_runner(root: Path, refittable: bool):
    from fluxtrt.backends.tensorrt.runtime import TrtRunner
    from fluxtrt.engines.manifest import Manifest

    spec = component_specs(Manifest.load(root).dims)["transformer"]
    return TrtRunner(spec, root / "transformer.plan", torch.bfloat16, "cuda", flavour=TENSORRT_RTX,
                     refittable=refittable)  # fmt: skip


def test_refittable_is_one_option_of_both_tensorrt_backends(plain):
    from fluxtrt.backends.base import declared_options, options_type
    from fluxtrt.backends.tensorrt import TensorRTRecord
    from fluxtrt.backends.tensorrt.plan import build_plan
    from fluxtrt.cli import build as build_command
    from fluxtrt.cli.options import given_options
    from fluxtrt.engines.manifest import Manifest

    declared = declared_options()["refittable"]
    assert (declared.type, declared.default, declared.flag.decls) == (bool, False, ("--refittable",))
    for backend in ("tensorrt", "tensorrt-rtx"):
        assert [d for d in options_type(backend).declared() if d.name == "refittable"] == [declared]
    for backend in ("onnxruntime", "aotinductor", "onnx"):
        assert "refittable" not in {d.name for d in options_type(backend).declared()}
    params = build_command.make_context("build", ["--model", "tiny", "--out", "x", "--refittable"]).params
    assert given_options({k: v for k, v in params.items() if k in declared_options()}) == {"refittable": True}
    # A manifest written before the option existed reads as not refittable, settings and record alike.
    entry = Manifest.load(plain).components["transformer"]
    cls = options_type("tensorrt-rtx")
    old = {k: v for k, v in entry.settings["options"].items() if k != "refittable"}
    assert cls.from_dict(old, "tensorrt-rtx").refittable is False and entry.settings["options"]["refittable"] is False
    assert entry.record.refittable is False and entry.record.refit_weights is None
    assert TensorRTRecord.from_json({"tensorrt_rtx": trt.__version__}).refittable is None
    # The plan: refittable for the transformer (and its parts) only.
    m = Manifest.load(plain)
    specs, onnx = component_specs(m.dims), plain / "onnx" / "transformer" / "model.onnx"
    profile = {k: tuple(map(tuple, v)) for k, v in entry.profile.items()}
    on = cls(refittable=True, compute_capabilities=("8.9",))
    assert build_plan(specs["transformer"], onnx, "bf16", profile, on, TENSORRT_RTX).refittable is True
    assert build_plan(specs["transformer"], onnx, "bf16", profile, cls(), TENSORRT_RTX).refittable is False


@pytest.mark.parametrize("precision", ["fp8", "fp4"])
def test_quantized_refittable_builds_are_refused_in_one_line(tmp_path, precision):
    from fluxtrt.backends.tensorrt import TensorRTBackend
    from fluxtrt.backends.tensorrt.plan import TensorRTOptions

    out = tmp_path / "e"
    line = one_error_line(run_cli("build", "--model", "tiny", "--backend", "tensorrt-rtx", "--precision", precision,
                                  "--refittable", "--out", str(out)))  # fmt: skip
    assert f"--refittable with --precision {precision}" in line and "build --precision bf16 --refittable" in line
    assert not out.exists()
    # TensorRT 10 (not installable here) refuses it with the same check, before its library is needed.
    with pytest.raises(InputError, match=f"--refittable with --precision {precision}: the transformer's linears"):
        TensorRTBackend().check_build(precision, TensorRTOptions(refittable=True))
    TensorRTBackend().check_build("bf16", TensorRTOptions(refittable=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present here")
def test_tensorrt_rtx_refittable_build_without_a_gpu_is_refused_in_one_line(tmp_path):
    out = tmp_path / "e"
    line = one_error_line(run_cli("build", "--model", "tiny", "--backend", "tensorrt-rtx", "--refittable",
                                  "--components", "transformer", "--out", str(out)))  # fmt: skip
    assert "TensorRT-RTX builds refittable plans only with a CUDA GPU and driver present" in line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present here")
def test_tensorrt_rtx_really_cannot_build_a_refittable_plan_without_a_gpu(plain, tmp_path):
    """Why the refusal above: the real build, its refittable weights marked, fails in TensorRT-RTX's compiler here
    (when a release builds it without a GPU, this fails and the refusal should go)."""
    from fluxtrt.backends.tensorrt.build import build_plan_file
    from fluxtrt.backends.tensorrt.plan import TensorRTRtxOptions, build_plan
    from fluxtrt.engines.manifest import Manifest

    m = Manifest.load(plain)
    profile = {k: tuple(map(tuple, v)) for k, v in m.components["transformer"].profile.items()}
    options = TensorRTRtxOptions(refittable=True, compute_capabilities=("8.9",))
    plan = build_plan(component_specs(m.dims)["transformer"], plain / "onnx" / "transformer" / "model.onnx", "bf16",
                      profile, options, TENSORRT_RTX)  # fmt: skip
    with pytest.raises(BuildError, match="CUDA") as info:
        build_plan_file(TENSORRT_RTX, plan, tmp_path / "transformer.plan")
    assert "failed to build the engine" in str(info.value)
    assert not (tmp_path / "transformer.plan").exists()


def test_every_linear_maps_to_one_refittable_initializer_holding_its_weight(plain, tiny):
    from fluxtrt.backends.tensorrt.refit import mark_refittable, refit_targets
    from fluxtrt.lora.fuse import linear_shapes

    onnx_path = plain / "onnx" / "transformer" / "model.onnx"
    linears = linear_shapes(tiny.transformer)
    targets = refit_targets(onnx_path)
    assert len(linears) == 30  # the tiny transformer's linears, attention, MLP, embedders and norms
    assert sorted(targets) == sorted(linears)
    assert len({t.name for t in targets.values()}) == len(targets)  # one initializer each, none shared
    # TensorRT-RTX's network holds each as a weight it can make refittable (and refuses a name it does not hold).
    builder, network, _parser = TENSORRT_RTX.polygraphy().NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
    assert mark_refittable(network, onnx_path, "transformer") == 30
    assert all(network.are_weights_marked_refittable(t.name) for t in targets.values())
    assert not network.mark_weights_refittable("transformer_blocks.0.attn.to_q.weight_missing")
    # The runner's originals, read from the ONNX: each linear's own PyTorch weight, [out, in], in the plan's bf16.
    weights = transformer_runner(plain, refittable=True).linear_weights()
    modules = dict(tiny.transformer.named_modules())
    for module, weight in weights.items():
        assert weight.dtype == torch.bfloat16 and tuple(weight.shape) == linears[module], module
        assert torch.equal(weight, modules[module].weight.detach().to(torch.bfloat16)), module


def test_a_plan_built_without_refittable_refuses_a_lora_in_one_line(plain, loras):
    from fluxtrt.lora.engines import apply_to_runner

    with pytest.raises(InputError) as info:
        apply_to_runner(transformer_runner(plain, refittable=False), [test_lora.read(loras["a"][0])])
    assert str(info.value) == (
        "--lora: transformer.plan was built without --refittable, so TensorRT-RTX cannot take new weights into it: "
        "rebuild with fluxtrt build --backend tensorrt-rtx --refittable"
    )


def _gpu_flavour() -> tuple[str | None, str]:
    """The backend that can build and refit a plan on this machine's GPU, or None and why not."""
    if not torch.cuda.is_available():
        return None, "refitting a TensorRT plan needs a CUDA GPU (none here): plans deserialize only on a GPU"
    major, minor = torch.cuda.get_device_capability()
    if major * 10 + minor in TENSORRT_RTX.runs_on:
        return "tensorrt-rtx", ""
    if importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt", ""
    return None, (f"this GPU (compute capability {major}.{minor}) is not one TensorRT-RTX runs on, and TensorRT 10 is "
                  "not installed (NVIDIA's package index or docker/)")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_flavour()[0] is None, reason=_gpu_flavour()[1])
def test_lora_refit_into_a_plan_equals_pytorch_fused_and_removal_restores(loras, torch_latents, tmp_path):
    """As the ONNX Runtime engines of tests/test_lora.py: the plan's edit with LoRA A, then A + B (0.5), against
    PyTorch with them fused; removal refits the ONNX's own weights, bit for bit."""
    from fluxtrt.engines.load import load_engine_pipeline
    from fluxtrt.lora.engines import apply_to_runner
    from tests.test_lora import edit, read, rel

    root = tmp_path / "e"
    build(root, backend=_gpu_flavour()[0], options={"refittable": True})
    record = json.loads((root / "manifest.json").read_text())["components"]["transformer"]["record"]
    assert record["refittable"] is True and record["refit_weights"] == 30
    want = {k: v.float() for k, v in torch_latents.items()}
    with load_engine_pipeline(root, "cuda") as pipeline:
        runner = pipeline.runners["transformer"]
        base = edit(pipeline).float().cpu()
        tolerance = max(10 * rel(base, want["none"]), 1e-3)  # what the bf16 plan has without a LoRA
        apply_to_runner(runner, [read(loras["a"][0])])
        with_a = edit(pipeline).float().cpu()
        assert rel(with_a, want["a"]) <= tolerance
        assert rel(with_a, base) > 10 * tolerance  # the LoRA changes the edit measurably
        apply_to_runner(runner, [read(loras["a"][0]), read(loras["b"][0], 0.5)])
        assert rel(edit(pipeline).float().cpu(), want["ab"]) <= tolerance
        apply_to_runner(runner, [])
        assert torch.equal(edit(pipeline).float().cpu(), base)
