"""What TensorRT made of a quantized ONNX, checked on the parsed network (no GPU needed).

A linear that the ONNX quantizes (DESIGN 5) must reach TensorRT as a matrix multiply whose two operands both come
from DequantizeLayers of FP8 (resp. FP4) data: the activation through its QuantizeLayer (FP8) or dynamic block
quantization (NVFP4), the weight from an FP8 (FP4) constant. The parser puts shuffles (broadcasts, reshapes) between
a DequantizeLayer and the matrix multiply; they are walked through. Counted against the ONNX's quantized linears,
nothing can silently stay in a higher precision.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from fluxtrt.errors import BuildError

# ONNX element types of quantized weights: FLOAT8E4M3FN = 17, FLOAT4E2M1 = 23.
_ONNX_LOW = {17: "fp8", 23: "fp4"}


def onnx_quantized_linears(onnx_path: Path) -> dict[str, int]:
    """How many weights of each low precision the ONNX dequantizes (one per quantized linear), read without
    loading external data: ``{"fp8": n}`` or ``{"fp4": n}``."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    types = {i.name: i.data_type for i in graph.initializer}
    found: Counter = Counter()
    for node in graph.node:
        # The weight's DequantizeLinear reads the quantized initializer; NVFP4 also dequantizes its FP8 block scales,
        # whose initializer name says so.
        if node.op_type == "DequantizeLinear" and node.input[0] in types and ".weight_" in node.input[0]:
            low = _ONNX_LOW.get(types[node.input[0]])
            if low and not node.input[0].endswith("_scale"):
                found[low] += 1
    return dict(found)


def quantized_matmuls(trt: Any, network: Any) -> dict[str, int]:
    """Per low precision, the matrix multiplies whose two operands are DequantizeLayers of that precision's data,
    and the quantize layers (QuantizeLayer to FP8, DynamicQuantizeLayer to FP4)."""
    passthrough = {trt.LayerType.SHUFFLE, trt.LayerType.IDENTITY, trt.LayerType.UNSQUEEZE, trt.LayerType.SQUEEZE}
    low = {trt.DataType.FP8: "fp8", trt.DataType.FP4: "fp4"}
    producers = {layer.get_output(j).name: layer for layer in network for j in range(layer.num_outputs)}

    def dequantized(tensor: Any) -> str | None:
        layer = producers.get(tensor.name)
        while layer is not None and layer.type in passthrough:
            layer = producers.get(layer.get_input(0).name)
        if layer is None or layer.type != trt.LayerType.DEQUANTIZE:
            return None
        return low.get(layer.get_input(0).dtype)

    counts: Counter = Counter()
    for layer in network:
        if layer.type == trt.LayerType.MATRIX_MULTIPLY:
            kinds = {dequantized(layer.get_input(0)), dequantized(layer.get_input(1))}
            if len(kinds) == 1 and None not in kinds:
                counts[f"{kinds.pop()}_matmuls"] += 1
        elif layer.type == trt.LayerType.QUANTIZE and layer.get_output(0).dtype == trt.DataType.FP8:
            counts["fp8_quantize"] += 1
        elif layer.type == trt.LayerType.DYNAMIC_QUANTIZE and layer.get_output(0).dtype == trt.DataType.FP4:
            counts["fp4_quantize"] += 1
    return dict(counts)


def check_quantized(trt: Any, network: Any, precision: str, onnx_linears: dict[str, int], component: str) -> dict:
    """``quantized_matmuls`` of the network, after checking that every quantized linear of the ONNX is an FP8 (FP4)
    matrix multiply behind its quantize layer.

    Raises:
        BuildError: fewer (or more) quantized matrix multiplies or quantize layers than the ONNX has linears.
    """
    counts = quantized_matmuls(trt, network)
    want = onnx_linears.get(precision, 0)
    got = (counts.get(f"{precision}_matmuls", 0), counts.get(f"{precision}_quantize", 0))
    if want == 0 or got != (want, want):
        raise BuildError(
            f"{component}: the ONNX quantizes {want} linears to {precision.upper()} but TensorRT's network has "
            f"{got[0]} {precision.upper()} matrix multiplies and {got[1]} {precision.upper()} quantize layers: "
            "some linears would run in higher precision; re-export the ONNX (fluxtrt build) rather than editing it"
        )
    return counts
