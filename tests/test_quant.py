"""fluxtrt.quant: calibration, the fake-quant oracle, FP8 and NVFP4 Q/DQ ONNX, and the quantized build."""

from __future__ import annotations

import copy
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import fluxtrt.engines.calibrate as calibration_module
from fluxtrt.backends.base import EngineBackend
from fluxtrt.backends.tensorrt.plan import onnx_quantization
from fluxtrt.config import BuildConfig
from fluxtrt.engines.build import build_engines
from fluxtrt.engines.calibrate import KEEP_OUT, Calibration, calibrate, load_calibration, quantized_linears
from fluxtrt.errors import DeviceError, InputError
from fluxtrt.quant.fakequant import fake_quantize
from fluxtrt.specs import Resolution

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

RES = Resolution(128, 128)
FINGERPRINT = "tiny-seed0"
# ORT's FP8 Q/DQ against the fake-quant oracle: the same E4M3 rounding, so only fp32 summation order differs (it
# changes with the thread count of either runtime). An activation within rounding error of the midpoint between two
# E4M3 values can be quantized one step apart, and the outputs it feeds differ by far more than the rounding: so
# nearly every output element is within the fp32 margin, and the few that are not stay within a bound (one E4M3
# step of one activation, propagated).
FP8_ATOL, FP8_RTOL = 2e-3, 1e-3
FP8_FLIPPED_SHARE, FP8_FLIPPED_ATOL = 0.005, 2e-2
NVFP4_ATOL, NVFP4_RTOL = 2e-3, 1e-3


def assert_fp8_close(got: torch.Tensor, oracle: torch.Tensor) -> None:
    """``got`` equals ``oracle`` to fp32 rounding but for a share of elements fed by a tie quantized the other way."""
    close = torch.isclose(got, oracle, atol=FP8_ATOL, rtol=FP8_RTOL)
    assert close.float().mean().item() >= 1 - FP8_FLIPPED_SHARE, f"{int((~close).sum())} of {close.numel()} differ"
    torch.testing.assert_close(got, oracle, atol=FP8_FLIPPED_ATOL, rtol=0)


def tiny_calibration(tiny, precision="fp8", seed=0) -> Calibration:
    return calibrate(tiny, fingerprint=FINGERPRINT, precision=precision, edits=1, seed=seed, steps=2,
                     width=RES.width, height=RES.height)  # fmt: skip


@pytest.fixture(scope="module")
def calibration(tiny) -> Calibration:
    return tiny_calibration(tiny)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """The tiny transformer exported once (fp32), and a small feed for it."""
    from fluxtrt.backends.torch_modules import component_module
    from fluxtrt.export.onnx import export_onnx
    from fluxtrt.specs import component_specs
    from fluxtrt.specs.flux import component_dims, dims_from_components

    dims = dims_from_components(tiny)
    spec = component_specs(dims)["transformer"]
    sample = spec.sample_feed(component_dims("transformer", dims, 2, Resolution(144, 160), RES), torch.float32)
    out = tmp_path_factory.mktemp("transformer-fp32")
    export_onnx(spec, component_module("transformer", tiny), sample, out)
    torch.manual_seed(1)
    feed = spec.sample_feed(component_dims("transformer", dims, 1, Resolution(128, 160), Resolution(160, 128)),
                            torch.float32)  # fmt: skip
    return out, spec, feed


def quantized_copy(exported, tmp_path: Path, amax: dict, precision: str) -> Path:
    from fluxtrt.quant.qdq import quantize_onnx

    src, _, _ = exported
    dst = tmp_path / precision
    shutil.copytree(src, dst)
    quantize_onnx(dst / "model.onnx", amax, precision)
    return dst / "model.onnx"


def torch_output(tiny, feed, amax=None, scheme=None) -> torch.Tensor:
    from fluxtrt.backends.torch_modules import TransformerModule

    transformer = copy.deepcopy(tiny.transformer)
    if amax is not None:
        fake_quantize(transformer, amax, scheme)
    with torch.no_grad():
        return TransformerModule(transformer).eval()(**feed)


def consumers(model, value_name: str) -> list:
    return [n for n in model.graph.node if value_name in n.input]


# --- (a) structure of the FP8 graph -----------------------------------------------------------------------------


def test_quantized_linears_are_the_token_linears(tiny):
    from fluxtrt.models.torchao_linears import token_linear_filter

    names = quantized_linears(tiny.transformer)
    keep = token_linear_filter(tiny.transformer)
    assert names == [n for n, m in tiny.transformer.named_modules() if keep(m, n)]
    assert not any(n.startswith(("x_embedder", "context_embedder", "time_text_embed", "norm_out")) for n in names)
    assert "proj_out" not in names and "single_transformer_blocks.0.proj_out" in names


def test_fp8_onnx_structure(tiny, calibration, exported, tmp_path):
    path = quantized_copy(exported, tmp_path, calibration.amax, "fp8")
    model = onnx.load(str(path))
    linears = quantized_linears(tiny.transformer)
    all_linears = [n for n, m in tiny.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    ops = Counter(n.op_type for n in model.graph.node)
    # One Q/DQ pair per quantized linear input, one DQ per quantized weight.
    assert ops["QuantizeLinear"] == len(linears) == len(all_linears) - 13
    assert ops["DequantizeLinear"] == 2 * len(linears)
    inits = {i.name: i for i in model.graph.initializer}
    by_output = {o: n for n in model.graph.node for o in n.output}
    quantized_nodes = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in by_output and node.input[1] not in inits:
            continue
        x_src, w_src = by_output.get(node.input[0]), by_output.get(node.input[1])
        is_q = w_src is not None and w_src.op_type == "DequantizeLinear" and w_src.input[0] in inits
        if not is_q:
            continue
        quantized_nodes += 1
        assert x_src.op_type == "DequantizeLinear" and by_output[x_src.input[0]].op_type == "QuantizeLinear"
        weight = inits[w_src.input[0]]
        assert weight.data_type == onnx.TensorProto.FLOAT8E4M3FN
        assert [a.i for a in w_src.attribute if a.name == "axis"] == [1]  # W^T [in, out]: output channels on axis 1
        assert list(inits[w_src.input[1]].dims) == [weight.dims[1]]
        name = w_src.input[0].removesuffix(".weight_fp8")
        assert name in linears
    assert quantized_nodes == len(linears)
    # Kept-out layers: their linears read plain fp32 initializers, no Q/DQ anywhere near them.
    for node in model.graph.node:
        if node.op_type == "Gemm":  # the embedders' and modulation linears
            assert node.input[1] in inits and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT
            assert by_output.get(node.input[0]) is None or by_output[node.input[0]].op_type != "DequantizeLinear"
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        assert not any(k.removeprefix("*.") in q.name for k in KEEP_OUT if k != "proj_out") and q.name != "proj_out"
    assert onnx_quantization(path) == {"fp8"}  # what the TensorRT backend requires of an fp8 transformer
    fp8_bytes = sum(int(np.prod(inits[f"{n}.weight_fp8"].dims)) for n in linears)
    fp32_bytes = sum(4 * tiny.transformer.get_submodule(n).weight.numel() for n in linears)
    assert fp8_bytes * 4 == fp32_bytes  # FP8 weights: 1 byte, a quarter of fp32 (half of bf16)


# --- (b) ORT on the FP8 graph against the fake-quant oracle --------------------------------------------------------


def test_fp8_onnx_runtime_matches_fake_quant(tiny, calibration, exported, tmp_path):
    import onnxruntime as ort

    path = quantized_copy(exported, tmp_path, calibration.amax, "fp8")
    _, spec, feed = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {k: feed[k].numpy() for k in spec.input_names})[0])
    oracle = torch_output(tiny, feed, calibration.amax, "fp8")
    plain = torch_output(tiny, feed)
    assert_fp8_close(got, oracle)
    rel = float((got - plain).norm() / plain.norm())
    print(f"\nFP8 (static, calibrated) vs unquantized fp32: relative L2 error {rel:.4f}, "
          f"max abs {float((got - plain).abs().max()):.4f} (|out| max {float(plain.abs().max()):.3f})")  # fmt: skip
    assert 0 < rel < 0.1


def test_fp8_with_external_data(calibration, exported, tmp_path):
    """Weights in model.onnx_data (as above 2 GB): the rewritten model keeps one data file and runs the same."""
    import onnx_ir as ir
    import onnxruntime as ort

    from fluxtrt.export.onnx import DATA_FILE

    src, spec, feed = exported
    ext = tmp_path / "external"
    ext.mkdir()
    ir.save(ir.load(str(src / "model.onnx")), ext / "model.onnx", external_data=DATA_FILE, size_threshold_bytes=1024)
    fp32_data = (ext / DATA_FILE).stat().st_size
    quantized_copy((ext, spec, feed), tmp_path / "q-ext", calibration.amax, "fp8")
    inline = quantized_copy(exported, tmp_path / "q-inline", calibration.amax, "fp8")
    path = tmp_path / "q-ext" / "fp8" / "model.onnx"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", DATA_FILE]
    assert (path.parent / DATA_FILE).stat().st_size < fp32_data
    run = {k: feed[k].numpy() for k in spec.input_names}
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, run)[0] for p in (path, inline)]
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("in_axis", [0, 1])
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_fp8_weight_quantization_is_bit_equal_to_ml_dtypes(dtype_name, in_axis):
    """The threaded torch quantizer against NumPy + ml_dtypes (round to nearest even), an all-zero channel included."""
    import ml_dtypes

    from fluxtrt.kernels.fp8 import FP8_MAX
    from fluxtrt.quant.qdq import quantize_fp8_weight

    dtype = ml_dtypes.bfloat16 if dtype_name == "bfloat16" else np.dtype(dtype_name)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 160)) * rng.uniform(0.01, 1000, (96, 160)) ** (rng.random((96, 160)) > 0.9)
    w = w.astype(dtype)
    w[(slice(None), 5) if in_axis == 0 else (5, slice(None))] = 0
    want_scale = (np.abs(w.astype(np.float32)).max(axis=in_axis) / FP8_MAX).astype(dtype)
    want_scale = np.where(want_scale > 0, want_scale, np.ones_like(want_scale))
    s = np.expand_dims(want_scale.astype(np.float32), in_axis)
    want = np.clip(w.astype(np.float32) / s, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    got, scale = quantize_fp8_weight(w, in_axis, dtype)
    assert got.dtype == ml_dtypes.float8_e4m3fn and scale.dtype == dtype
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    np.testing.assert_array_equal(scale.view(np.uint8), want_scale.view(np.uint8))


def test_export_with_qdq_rewrite_equals_the_file_rewrite(tiny, calibration, exported, tmp_path):
    """Q/DQ inserted in memory before the one write (how build exports a quantized transformer) gives the graph
    that rewriting the written file gives: the same nodes in order and bit-equal initializers."""
    from fluxtrt.backends.torch_modules import component_module
    from fluxtrt.export.onnx import export_onnx
    from fluxtrt.quant.qdq import quantize_model
    from fluxtrt.specs.flux import component_dims, dims_from_components

    _, spec, feed = exported

    sample = spec.sample_feed(component_dims("transformer", dims_from_components(tiny), 2, Resolution(144, 160), RES),
                              torch.float32)  # fmt: skip
    (tmp_path / "mem").mkdir()
    rewrite = lambda model: quantize_model(model, calibration.amax, "fp8")  # noqa: E731
    in_memory = export_onnx(spec, component_module("transformer", tiny), sample, tmp_path / "mem", rewrite=rewrite)
    assert "rewrite" in in_memory.phases
    file_rewrite = quantized_copy(exported, tmp_path, calibration.amax, "fp8")
    a, b = (onnx.load(str(p)) for p in (in_memory.model, file_rewrite))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    inits_b = {i.name: i for i in b.graph.initializer}
    assert sorted(i.name for i in a.graph.initializer) == sorted(inits_b)
    for init in a.graph.initializer:
        assert onnx.numpy_helper.to_array(init).tobytes() == onnx.numpy_helper.to_array(inits_b[init.name]).tobytes()
    outs = [ort_output(p, spec, feed) for p in (in_memory.model, file_rewrite)]
    np.testing.assert_array_equal(outs[0], outs[1])


def ort_output(path: Path, spec, feed) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: feed[k].numpy() for k in spec.input_names})[0]


# --- (c) NVFP4 graph in onnx.reference against the fake-quant oracle -----------------------------------------------


def test_nvfp4_onnx_reference_matches_fake_quant(tiny, calibration, exported, tmp_path):
    from onnx.reference import ReferenceEvaluator

    from fluxtrt.quant.qdq import reference_ops

    path = quantized_copy(exported, tmp_path, calibration.amax, "fp4")
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    fp4 = [i for i in inits.values() if i.data_type == onnx.TensorProto.FLOAT4E2M1]
    assert len(fp4) == len(calibration.amax)
    assert {o.domain: o.version for o in model.opset_import}[""] == 23
    assert "fp4" in onnx_quantization(path)
    _, spec, feed = exported
    evaluator = ReferenceEvaluator(model, new_ops=reference_ops())
    got = torch.from_numpy(evaluator.run(None, {k: feed[k].numpy() for k in spec.input_names})[0])
    oracle = torch_output(tiny, feed, calibration.amax, "fp4")
    plain = torch_output(tiny, feed)
    torch.testing.assert_close(got, oracle, atol=NVFP4_ATOL, rtol=NVFP4_RTOL)
    rel = float((got - plain).norm() / plain.norm())
    print(f"\nNVFP4 vs unquantized fp32: relative L2 error {rel:.4f}")
    assert 0 < rel < 0.5


# --- (d) calibration determinism and reuse in a build --------------------------------------------------------------


def test_static_fp8_linear_matches_fake_quant():
    """``StaticFp8Linear`` (real FP8 GEMM, ``torch._scaled_mm``) against the fake-quant oracle, per layer.

    Same FP8 values on both sides, so what differs is fp32 summation order and rounding to bf16: the oracle rounds
    once, the layer twice (the GEMM's bf16 output, then the bias add), so up to one bf16 ulp (2^-7 relative). Inputs
    beyond the calibrated amax exercise the saturation. (The layer multiplies by the reciprocal scale where the oracle
    divides: the two agree except on an exact tie between two e4m3 values, which a bf16 input over an amax of
    half a bf16 value often makes, so the amax here is not one; ``test_gelu.py`` bounds the tie case.)
    """
    from fluxtrt.kernels.fp8_linear import StaticFp8Linear, static_fp8_linears
    from fluxtrt.quant.fakequant import FakeQuantLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80).to(torch.bfloat16)
    x = torch.randn(2, 33, 96, dtype=torch.bfloat16) * 3
    amax = float(x.abs().max()) / 2.1  # under half the inputs' range: the largest ones saturate
    with torch.no_grad():
        got = StaticFp8Linear(linear, amax)(x).float()
        want = FakeQuantLinear(linear, "fp8", amax)(x.float()).float()
        plain = linear(x).float()
    torch.testing.assert_close(got, want, atol=1e-2, rtol=2**-7)
    assert (want - plain).abs().max() > 20 * (got - want).abs().max()  # the quantization is visible, and followed

    model = torch.nn.Sequential(linear)
    with static_fp8_linears(model, {"0": amax}):
        assert isinstance(model[0], StaticFp8Linear)
    assert model[0] is linear
    with pytest.raises(KeyError, match="1 is not an nn.Linear"), static_fp8_linears(model, {"0": amax, "1": amax}):
        pass
    assert model[0] is linear  # what was swapped before the error is put back


def test_calibration_is_deterministic_and_round_trips(tiny, calibration, tmp_path):
    again = tiny_calibration(tiny)
    assert again.amax == calibration.amax
    assert set(calibration.amax) == set(quantized_linears(tiny.transformer))
    assert tiny_calibration(tiny, seed=1).amax != calibration.amax
    path = calibration.save(tmp_path / "cal.safetensors")
    loaded = load_calibration(path, FINGERPRINT, "fp8")
    assert loaded.amax == pytest.approx(calibration.amax, rel=1e-7)
    for key in ("model_fingerprint", "precision", "seed", "edits", "steps", "fluxtrt"):
        assert key in loaded.meta
    assert loaded.meta["edits"] == 1 and loaded.meta["steps"] == 2
    assert loaded.attention_v == pytest.approx(calibration.attention_v, rel=1e-7)
    assert loaded.meta["attention_v"] == len(calibration.attention_v) == 2  # one double block, one single block


def test_calibrated_v_amax_is_the_largest_v_each_attention_computes(tiny):
    """The V amax the calibration records (forward hooks on the V projections) against V recomputed, in the same
    run, by a processor wrapped around diffusers' own from the attention's inputs: equal for each attention, both
    streams of the double block counted."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    transformer = tiny.transformer
    seen: dict[str, float] = {}

    class Recording(FluxAttnProcessor):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            values = [attn.to_v(hidden_states)]
            if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
                values.append(attn.add_v_proj(encoder_hidden_states))
            top = max(float(v.abs().max()) for v in values)
            seen[self.name] = max(seen.get(self.name, 0.0), top)
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    saved = transformer.attn_processors
    transformer.set_attn_processor({n: Recording(n.removesuffix(".processor")) for n in saved})
    try:
        calibration = tiny_calibration(tiny, seed=3)
    finally:
        transformer.set_attn_processor(saved)
    attentions = {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    assert set(calibration.attention_v) == set(seen) == attentions
    for name, value in seen.items():
        assert calibration.attention_v[name] == pytest.approx(value, rel=1e-6)
    # A build carries them beside the linears, under the attention's name and a suffix the linears never end with.
    scales = calibration.scales()
    assert len(scales) == len(calibration.amax) + 2 and scales["transformer_blocks.0.attn.attention_v"] > 0


class OnnxCopyBackend(EngineBackend):
    """A backend whose engine is the (quantized) ONNX itself: lets the build run fp8/fp4 without TensorRT."""

    name = "onnx-copy"
    extension = ".onnx"
    uses_onnx = True
    precisions = ("fp8", "fp4")

    def check_available(self) -> None:
        pass

    def version(self) -> str:
        return "1"

    def build(self, job):
        from fluxtrt.backends.record import BackendRecord

        shutil.copyfile(job.onnx_path, job.engine_path)
        return BackendRecord()

    def load(self, job):
        raise NotImplementedError


def quant_config(out: Path, **kw) -> BuildConfig:
    kw = {"calibration_edits": 1, "precision": "fp8", **kw}
    return BuildConfig(model="tiny", backend="onnx-copy", out=out, min_resolution=RES,
                       opt_resolution=RES, max_resolution=Resolution(256, 256), components=("transformer",),
                       **kw)  # fmt: skip


def test_build_fp8_calibrates_once_and_reuses_saved_scales(tmp_path, monkeypatch):
    runs = []  # a spy on the calibration the build runs
    monkeypatch.setattr(calibration_module, "calibrate", lambda *a, **kw: runs.append(1) or calibrate(*a, **kw))
    out = tmp_path / "engines"
    said = []
    report = build_engines(quant_config(out), lambda c, m: said.append((c, m)), backend=OnnxCopyBackend())
    assert len(runs) == 1
    # The calibration is a row of the report, and its progress goes where the build's goes, before the transformer.
    assert (report.calibration.name, report.calibration.status) == ("calibration", "computed")
    assert report.calibration.seconds > 0 and [r.name for r in report.results] == ["transformer"]
    progress = [m for c, m in said if c == "calibration"]
    assert progress[1:] == ["1 edits of 14 steps at 128x128, in one batch", progress[-1]]
    assert progress[-1].startswith("1 edits done in ")
    assert said.index(("calibration", progress[-1])) < [c for c, _ in said].index("transformer")
    manifest = report.manifest
    assert manifest.calibration == "calibration/transformer-fp8.safetensors"
    assert "calibration" in manifest.components["transformer"].settings
    model = onnx.load(str(out / "onnx" / "transformer" / "model.onnx"))
    types = Counter(i.data_type for i in model.graph.initializer)
    assert types[onnx.TensorProto.FLOAT8E4M3FN] == len(quantized_linears(_tiny_transformer())) + 1  # + zero point
    # BF16 graph: quantized weights in 1 byte instead of 2.
    fp8 = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.name.endswith(".weight_fp8"))
    bf16 = sum(2 * _tiny_transformer().get_submodule(n).weight.numel() for n in quantized_linears(_tiny_transformer()))
    assert 2 * fp8 == bf16

    # A new directory given the saved file builds without calibrating; so does a rerun over the first directory.
    other = tmp_path / "other"
    report = build_engines(quant_config(other, calibration=out / manifest.calibration), backend=OnnxCopyBackend())
    assert len(runs) == 1
    assert (
        report.manifest.components["transformer"].settings["calibration"]
        == (manifest.components["transformer"].settings["calibration"])
    )
    assert report.calibration.status == "given"
    again = build_engines(quant_config(out), backend=OnnxCopyBackend())
    assert again.results[0].status == "up to date" and again.calibration.status == "reused"
    assert len(runs) == 1


def test_a_test_sized_model_calibrates_in_one_batch_and_a_full_size_one_as_before():
    """The recipe follows the model: the tiny transformer (82 thousand parameters) calibrates its edits in one batch
    at 128x128; a transformer of FLUX's size keeps the full recipe, one edit after another at the opt resolution."""
    from fluxtrt.engines.calibrate import Recipe, recipe_for

    for model, want in (("tiny", Recipe(8, None, 128, 128, batched=True)),
                        ("random-full", Recipe(8, None, 1024, 1024, batched=False))):  # fmt: skip
        config = BuildConfig(model=model, backend="onnx", precision="fp8", out=Path("unused"), calibration_edits=8)
        assert recipe_for(config) == want


def test_a_batched_calibration_sees_every_linear_at_its_size(tiny):
    said = []
    result = calibrate(tiny, fingerprint=FINGERPRINT, precision="fp8", edits=3, steps=2, width=64, height=96,
                       batched=True, on_progress=said.append)  # fmt: skip
    linears = quantized_linears(tiny.transformer)
    assert sorted(result.amax) == sorted(linears) and all(v > 0 for v in result.amax.values())
    assert len(result.attention_v) == 2  # one double and one single block
    assert result.meta["batched"] is True and result.meta["resolution"] == "64x96" and result.meta["edits"] == 3
    assert said[0] == "3 edits of 2 steps at 64x96, in one batch" and len(said) == 2
    # One edit after another (the full recipe, each at its image's ~1 MP preferred size): a line per edit, and no
    # batched key in the sidecar's meta.
    said.clear()
    sequential = calibrate(tiny, fingerprint=FINGERPRINT, precision="fp8", edits=1, steps=1, width=64, height=64,
                           on_progress=said.append)  # fmt: skip
    assert "batched" not in sequential.meta and len(said) == 1 and said[0].startswith("edit 1/1 (1 steps) done")


def _tiny_transformer():
    from fluxtrt.models import load_components

    return load_components("tiny", "cpu", "fp32").transformer


# --- (e) bad input ------------------------------------------------------------------------------------------------


def test_zero_calibration_edits(tiny, tmp_path):
    with pytest.raises(InputError, match="--calibration-edits is 0, expected an integer >= 1"):
        calibrate(tiny, fingerprint=FINGERPRINT, precision="fp8", edits=0)
    with pytest.raises(InputError, match="--calibration-edits is 0"):
        quant_config(tmp_path / "x", calibration_edits=0)


@pytest.mark.parametrize(("fingerprint", "precision", "key"), [("random-full-seed0", "fp8", "model_fingerprint"),
                                                                 (FINGERPRINT, "fp4", "precision")])  # fmt: skip
def test_calibration_from_another_model_or_precision(calibration, tmp_path, fingerprint, precision, key):
    path = calibration.save(tmp_path / "cal.safetensors")
    with pytest.raises(
        InputError,
        match=f"was computed for {key} .* this build has '{fingerprint if key != 'precision' else precision}'",
    ):
        load_calibration(path, fingerprint, precision)


def test_fp4_torchao_path_needs_an_fp4_gpu(tiny):
    from fluxtrt.models.torchao_linears import quantize_transformer

    transformer = copy.deepcopy(tiny.transformer)
    with pytest.raises(DeviceError, match="FP4 linears are unavailable on cpu"):
        quantize_transformer(transformer, "fp4")


def test_build_fp8_parts_with_jobs_calibrates_once_before_the_workers(tmp_path, monkeypatch):
    """--jobs 2 --first-block-cache: the parent calibrates once (a spy here sees it), and each worker builds one part
    with Q/DQ on exactly the linears that part computes."""
    from fluxtrt.backends.torch_modules import part_owns_linear

    runs = []
    monkeypatch.setattr(calibration_module, "calibrate", lambda *a, **kw: runs.append(1) or calibrate(*a, **kw))
    said = []
    out = tmp_path / "jobs2"
    report = build_engines(quant_config(out, first_block_cache=True, jobs=2), lambda c, m: said.append((c, m)),
                           backend=OnnxCopyBackend())  # fmt: skip
    assert len(runs) == 1 and [r.status for r in report.results] == ["built", "built"]
    workers = {c: m for c, m in said if m.startswith("building in worker process ")}
    assert set(workers) == {"transformer_first", "transformer_rest"}
    assert f"building in worker process {os.getpid()}" not in workers.values()
    linears = quantized_linears(_tiny_transformer())
    calibration_hash = report.manifest.components["transformer_first"].settings["calibration"]
    for name in ("transformer_first", "transformer_rest"):
        entry = report.manifest.components[name]
        assert entry.settings["calibration"] == calibration_hash
        model = onnx.load(str(out / entry.engine.path))
        fp8 = Counter(i.data_type for i in model.graph.initializer)[onnx.TensorProto.FLOAT8E4M3FN]
        owned = [n for n in linears if part_owns_linear(name, n)]
        assert 0 < len(owned) < len(linears) and fp8 == len(owned) + 1, name  # + the shared zero point
