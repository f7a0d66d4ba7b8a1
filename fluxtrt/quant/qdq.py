"""Exported transformer ONNX -> Q/DQ ONNX for TensorRT: static FP8 (opset 19) or NVFP4 (opset 23).

The exporter writes a linear layer as MatMul(x, W^T) (+ Add for the bias), W^T an initializer [in, out], or as
Gemm(x, W, b, transB=1); each node records the torch module it came from in ``pkg.torch.onnx.name_scopes``, which
is how a node is matched to its calibrated linear. For every calibrated linear this inserts, in the graph's dtype:

FP8 (TensorRT's strongly typed FP8 path)::

    x -> QuantizeLinear(s_x, zp=fp8 0) -> DequantizeLinear(s_x) -> MatMul <- DequantizeLinear(axis=out) <- W fp8
                                                                              (s_w, one per output channel)

NVFP4 (NVIDIA's two-level scaling; TensorRT's FP4 recipe as ModelOpt exports it for Blackwell)::

    x -> trt::TRT_FP4DynamicQuantize(g_x) -> (x fp4, block scales fp8) -> DQ(g_x) -> DQ(block 16, axis -1) -> MatMul
    W fp4 [in, out] -> DQ(block 16 along in) <- DQ(g_w) <- block scales fp8 [in/16, out]

``TRT_FP4DynamicQuantize`` (domain ``trt``; attributes axis=-1, block_size=16, scale_type=FLOAT8E4M3FN) is the
custom op TensorRT's ONNX parser maps to its dynamic block quantization layer (NVIDIA ModelOpt's
``export_onnx``: "input/output activation quantizers use dynamic export (TRT_FP4DynamicQuantize)"); standard ONNX has
no dynamic block quantization. ``reference_ops()`` gives a NumPy implementation for ``onnx.reference``.

Every scale is stored in the graph's dtype (DequantizeLinear outputs the scale's type), so the NVFP4 global scales
of a BF16 graph are BF16 rather than NVIDIA's FP32; quantization uses the rounded values, so the graph is exact to
itself.
"""

from __future__ import annotations

import ast
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fluxtrt.errors import BuildError, InputError
from fluxtrt.kernels.fp8 import FP8_MAX
from fluxtrt.quant.fakequant import FP4_BLOCK, FP4_MAX

FP4_OPSET = 23
TRT_DOMAIN = "trt"
FP8_TYPE = 17  # TensorProto.FLOAT8E4M3FN
_SCOPES = "pkg.torch.onnx.name_scopes"
_MODULE_PREFIX = "transformer."  # TransformerModule keeps the diffusers model as .transformer


@dataclass
class QdqReport:
    """What the transform did: linears quantized, and the bytes of their weights before and after."""

    precision: str
    linears: list[str]
    weight_bytes_before: int
    weight_bytes_after: int


def _np_dtype(data_type: Any) -> Any:
    return data_type.numpy()


def _module_of(node: Any) -> str | None:
    scopes = node.metadata_props.get(_SCOPES)
    if not scopes:
        return None
    names = ast.literal_eval(scopes)  # ['', 'transformer', ..., 'transformer.x.to_q', 'linear_11']
    return names[-2].removeprefix(_MODULE_PREFIX) if len(names) >= 2 else None


def _linear_nodes(graph: Any, linears: set[str]) -> dict[str, tuple[Any, int]]:
    """linear name -> (its MatMul/Gemm node, the weight's input-dimension axis as it appears in the graph)."""
    found: dict[str, tuple[Any, int]] = {}
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        name = _module_of(node)
        if name not in linears:
            continue
        weight = node.inputs[1]
        if weight is None or not weight.is_initializer() or weight.const_value is None:
            raise BuildError(
                f"transformer ONNX: the weight of linear {name} is not an initializer but {weight}: export without "
                "weight transforms, or add the layer to the kept-out list"
            )
        if name in found:
            raise BuildError(f"transformer ONNX: linear {name} appears in two nodes, expected one: keep it out")
        if node.op_type == "MatMul":
            in_axis = 0  # W^T [in, out]
        else:
            attrs = node.attributes
            trans_b = attrs["transB"].as_int() if "transB" in attrs else 0
            in_axis = 1 if trans_b else 0
        found[name] = (node, in_axis)
    missing = sorted(linears - set(found))
    if missing:
        raise BuildError(
            f"transformer ONNX: {len(missing)} calibrated linears have no MatMul/Gemm in the graph "
            f"(e.g. {missing[0]}): "
            "the calibration was computed for another model layout; calibrate again"
        )
    return found


def quantize_fp8_weight(w: np.ndarray, in_axis: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(FP8 weight, per-output-channel scale in ``dtype``) for a weight laid out as in the graph.

    Computed with torch (threaded; the full transformer's 11.9B weights take minutes in NumPy), bit-equal to NumPy
    with ml_dtypes: both divide in fp32 and round to nearest even.
    """
    import ml_dtypes
    import torch

    t = _as_torch(w).float()
    scale = (t.abs().amax(dim=in_axis) / FP8_MAX).to(_as_torch(np.zeros(0, dtype)).dtype)  # as the graph stores it
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(t / scale.float().unsqueeze(in_axis), -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn), _as_numpy(scale, dtype)


def _as_torch(a: np.ndarray) -> Any:
    """A NumPy array (ml_dtypes bfloat16 included) as a torch tensor sharing its memory."""
    import ml_dtypes
    import torch

    a = np.ascontiguousarray(a)
    with warnings.catch_warnings():  # a read-only array (weights mapped from the data file): only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)


def _as_numpy(t: Any, dtype: Any) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(dtype)
    return t.numpy().astype(dtype, copy=False)


def quantize_nvfp4(x: np.ndarray, global_scale: float, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """NVFP4 of ``x`` in blocks of 16 along ``axis``: (FP4 values like x, FP8 block scales with axis / 16)."""
    import ml_dtypes

    x = np.moveaxis(x.astype(np.float32), axis, -1)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // FP4_BLOCK, FP4_BLOCK)  # [..., K/16, 16]
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    b = np.minimum(amax / FP4_MAX / np.float32(global_scale), FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    s = b.astype(np.float32) * np.float32(global_scale)
    q = np.where(s > 0, np.clip(blocks / np.where(s > 0, s, 1), -FP4_MAX, FP4_MAX), 0).astype(ml_dtypes.float4_e2m1fn)
    return np.moveaxis(q.reshape(x.shape), -1, axis), np.moveaxis(b[..., 0], -1, axis)


def quantize_onnx(model_path: Path, amax: dict[str, float], precision: str) -> QdqReport:
    """Rewrite ``model_path`` (and its ``model.onnx_data``, if any) in place with Q/DQ on the calibrated linears.

    Args:
        model_path: ``model.onnx`` from ``export_onnx`` of the transformer (fp32 or bf16 graph, opset 19).
        amax: calibrated input amax per linear (names in the transformer); exactly these linears are quantized.
        precision: ``fp8`` or ``fp4``.

    Returns:
        The linears quantized and their weight bytes before and after.

    Raises:
        InputError: unknown precision or an empty calibration.
        BuildError: a calibrated linear is missing in the graph, or the written model fails the checker.
    """
    import onnx_ir as ir

    from fluxtrt.export.onnx import DATA_FILE

    model_path = Path(model_path)
    external = (model_path.parent / DATA_FILE).exists()
    model = ir.load(str(model_path))
    report = quantize_model(model, amax, precision)
    _save(ir, model, model_path, external)
    check_quantized(model_path, precision)
    return report


def quantize_model(model: Any, amax: dict[str, float], precision: str) -> QdqReport:
    """Insert Q/DQ on the calibrated linears of an in-memory ``onnx_ir`` model (what ``export_onnx(rewrite=...)``
    hands over, so a large transformer is written once, already quantized, instead of written, read and written).

    Args and Raises: as ``quantize_onnx`` (nothing is written here).
    """
    import onnx_ir as ir

    if precision not in ("fp8", "fp4"):
        raise InputError(f"precision is '{precision}', expected fp8 or fp4 for a Q/DQ transformer")
    if not amax:
        raise InputError("the calibration holds no linears: calibrate again with --calibration-edits N (N >= 1)")
    graph = model.graph
    nodes = _linear_nodes(graph, set(amax))
    builder = _QdqBuilder(ir, graph)
    quantize = builder.fp8 if precision == "fp8" else builder.fp4
    before = after = 0
    for name, (node, in_axis) in sorted(nodes.items()):
        old_w = node.inputs[1]
        before += old_w.const_value.nbytes
        new, dq, dq_w, weight_bytes = quantize(name, node.inputs[0], old_w.const_value, in_axis, amax[name])
        after += weight_bytes
        graph.insert_before(node, new)
        node.replace_input_with(0, dq.outputs[0])
        node.replace_input_with(1, dq_w.outputs[0])
        if not old_w.uses():
            graph.initializers.pop(old_w.name)
    if precision == "fp4":
        model.opset_imports[""] = FP4_OPSET
        model.opset_imports[TRT_DOMAIN] = 1
    return QdqReport(precision, sorted(nodes), before, after)


def check_quantized(model_path: Path, precision: str) -> None:
    """onnx.checker on a written FP8 Q/DQ model (an NVFP4 one uses TensorRT's custom domain, which it cannot check).

    Raises:
        BuildError: the model fails the checker.
    """
    import onnx

    if precision != "fp8":
        return
    try:
        onnx.checker.check_model(str(model_path))
    except onnx.checker.ValidationError as exc:
        raise BuildError(f"transformer: the FP8 Q/DQ ONNX fails onnx.checker: {str(exc).splitlines()[0]}") from exc


class _QdqBuilder:
    """Makes the Q/DQ nodes and constants of one linear (in the graph's dtype, which its weight has).

    ``fp8``/``fp4`` return (the new nodes in order, the input's DequantizeLinear, the weight's DequantizeLinear,
    the bytes of the quantized weight and its scales).
    """

    def __init__(self, ir: Any, graph: Any):
        self.ir, self.graph = ir, graph
        self.fp8_zero: Any = None

    def constant(self, name: str, array: np.ndarray) -> Any:
        value = self.ir.Value(name=name, const_value=self.ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def fp8(self, name: str, x: Any, weight: Any, in_axis: int, amax: float) -> tuple[list, Any, Any, int]:
        import ml_dtypes

        ir, np_dtype = self.ir, _np_dtype(weight.dtype)
        if self.fp8_zero is None:
            self.fp8_zero = self.constant("fp8_zero_point", np.zeros((), dtype=ml_dtypes.float8_e4m3fn))
        s_x = self.constant(f"{name}.input_scale", np.array(amax / FP8_MAX, dtype=np_dtype))
        q = ir.node("QuantizeLinear", [x, s_x, self.fp8_zero], num_outputs=1, name=f"{name}/input_quantize")
        dq = ir.node("DequantizeLinear", [q.outputs[0], s_x, self.fp8_zero], name=f"{name}/input_dequantize")
        w_q, w_scale = quantize_fp8_weight(weight.numpy(), in_axis, np_dtype)
        w_value = self.constant(f"{name}.weight_fp8", w_q)
        s_w = self.constant(f"{name}.weight_scale", w_scale)
        dq_w = ir.node(
            "DequantizeLinear", [w_value, s_w], attributes={"axis": 1 - in_axis}, name=f"{name}/weight_dequantize"
        )
        return [q, dq, dq_w], dq, dq_w, w_value.const_value.nbytes

    def fp4(self, name: str, x: Any, weight: Any, in_axis: int, amax: float) -> tuple[list, Any, Any, int]:
        ir, np_dtype = self.ir, _np_dtype(weight.dtype)
        g_x = self.constant(f"{name}.input_global_scale", np.array(amax / (FP4_MAX * FP8_MAX), dtype=np_dtype))
        dyn = ir.node(
            "TRT_FP4DynamicQuantize",
            [x, g_x],
            domain=TRT_DOMAIN,
            num_outputs=2,
            attributes={"axis": -1, "block_size": FP4_BLOCK, "scale_type": FP8_TYPE},
            name=f"{name}/input_fp4_quantize",
        )
        x_scale = ir.node("DequantizeLinear", [dyn.outputs[1], g_x], name=f"{name}/input_scale_dequantize")
        dq = ir.node("DequantizeLinear", [dyn.outputs[0], x_scale.outputs[0]],
                     attributes={"axis": -1, "block_size": FP4_BLOCK}, name=f"{name}/input_dequantize")  # fmt: skip
        w = weight.numpy()
        g = float(np.array(np.abs(w).max() / (FP4_MAX * FP8_MAX), dtype=np_dtype))  # as the graph stores it
        w_q, w_b = quantize_nvfp4(w, g, in_axis)
        g_w = self.constant(f"{name}.weight_global_scale", np.array(g, dtype=np_dtype))
        w_value = self.constant(f"{name}.weight_fp4", w_q)
        b_value = self.constant(f"{name}.weight_block_scale", w_b)
        w_scale = ir.node("DequantizeLinear", [b_value, g_w], name=f"{name}/weight_scale_dequantize")
        blocks = {"axis": in_axis, "block_size": FP4_BLOCK}
        dq_w = ir.node("DequantizeLinear", [w_value, w_scale.outputs[0]], attributes=blocks,
                       name=f"{name}/weight_dequantize")  # fmt: skip
        return [dyn, x_scale, dq, w_scale, dq_w], dq, dq_w, w_value.const_value.nbytes + b_value.const_value.nbytes


def _save(ir: Any, model: Any, model_path: Path, external: bool) -> None:
    """Write next to the old files, then swap them in (the old data file may still back lazily read weights)."""
    from fluxtrt.export.onnx import DATA_FILE

    work = model_path.parent / ".qdq"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        if external:
            ir.save(model, work / model_path.name, external_data=DATA_FILE, size_threshold_bytes=1024)
            os.replace(work / DATA_FILE, model_path.parent / DATA_FILE)
        else:
            ir.save(model, work / model_path.name)
        os.replace(work / model_path.name, model_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def reference_ops() -> list[type]:
    """``onnx.reference`` implementations of the custom ops the NVFP4 graph uses (``TRT_FP4DynamicQuantize``)."""
    from onnx.reference.op_run import OpRun

    class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 (the op's name)
        op_domain = TRT_DOMAIN

        def _run(self, x, global_scale, axis=-1, block_size=FP4_BLOCK, scale_type=None):
            if block_size != FP4_BLOCK:
                raise ValueError(f"block_size {block_size}, expected {FP4_BLOCK}")
            q, b = quantize_nvfp4(x, float(global_scale), axis)
            return q, b

    return [TRT_FP4DynamicQuantize]
