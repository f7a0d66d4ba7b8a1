"""The static FP8 scheme on real FP8 matrix multiplies (``torch._scaled_mm``), for engines compiled from PyTorch.

Same numbers as ``fluxtrt.quant.fakequant``'s fp8 and the FP8 Q/DQ ONNX (DESIGN 5): the activation quantized with its
calibrated per-tensor scale, the weight stored as float8_e4m3fn with one scale per output channel. The multiply is
``torch._scaled_mm`` with row-wise scales: one FP8 GEMM with the scales applied in its epilogue, the kernel torchao
uses for its per-row FP8, with torchao's fast accumulation (``use_fast_accum=True``, torchao's default for per-row
FP8 inference): without it cuBLASLt picks another kernel for the same shapes, and the 266 GEMMs of a 1024x1024 step
took 88.6 ms in an AOTInductor engine against 78.0 ms in torchao's stage 3 (benchmarks/results/README.md).
AOTInductor exports it as is. The input is quantized by multiplying with the reciprocal of its scale, held as a
buffer: in the kernel that fuses the quantization into the norm or GELU in front, a multiply per element instead of
a division (measured in benchmarks/results/README.md, step_levers2_h200.json). The activation's scale is folded
into the weight's per-column one, so the per-row scale is all ones: a slice of one buffer every layer shares
(``static_fp8_linears(..., max_rows)``), where a compiled engine would otherwise write a copy of the layer's scale
per row before each of its 266 GEMMs per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from fluxtrt.kernels.fp8 import fp8_scale, fp8_weight, quantize_fp8_by_inverse


def fp8_linear_constants(weight: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear's weight [out, in] as a ``StaticFp8Linear`` with input scale ``input_scale`` [1, 1] holds it: (the
    float8_e4m3fn weight, the GEMM's per-column scale [1, out] fp32: the weight's per output channel times the
    input's)."""
    weight_q, weight_scale = fp8_weight(weight)
    return weight_q, (weight_scale.reshape(1, -1) * input_scale).contiguous()


def fp8_linear_weight(weight_q: torch.Tensor, output_scale: torch.Tensor,
                      input_inverse_scale: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The weight [out, in] (fp32) that a ``StaticFp8Linear``'s constants stand for: what its GEMM multiplies the
    unscaled input by (``weight_q`` times its row's ``output_scale`` over the input's scale)."""
    return weight_q.float() * (output_scale.reshape(-1, 1) * input_inverse_scale)


class StaticFp8Linear(nn.Module):
    """An ``nn.Linear`` with FP8 weights and a static FP8 input scale, computed by ``torch._scaled_mm``.

    Args:
        linear: the layer to replace (its weight is quantized, its bias kept in the compute dtype).
        input_amax: the calibrated amax of the layer's input.
        unit_rows: fp32 ones [R, 1] on the layer's device, R at least the rows of any input, for the GEMM's per-row
            scale (shared between layers); None makes a fresh one per call.
    """

    def __init__(self, linear: nn.Linear, input_amax: float, unit_rows: torch.Tensor | None = None):
        super().__init__()
        amax = torch.tensor([[input_amax]], dtype=torch.float32, device=linear.weight.device)
        self.register_buffer("input_scale", fp8_scale(amax))  # [1, 1] fp32
        self.register_buffer("input_inverse_scale", 1.0 / self.input_scale)  # [1, 1] fp32
        weight_q, output_scale = fp8_linear_constants(linear.weight, self.input_scale)
        self.register_buffer("weight", weight_q)  # [out, in] float8_e4m3fn
        self.register_buffer("output_scale", output_scale)  # [1, out] fp32
        self.register_buffer("unit_rows", unit_rows, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def quantize_input(self, rows: torch.Tensor) -> torch.Tensor:
        """The input rows [M, K] as float8_e4m3fn with the static scale."""
        return quantize_fp8_by_inverse(rows, self.input_inverse_scale)

    def matmul(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The input rows [M, K] quantized and multiplied by the FP8 weight, ``bias`` (or None) in the GEMM's
        epilogue: [M, out] in the rows' dtype."""
        xq = self.quantize_input(rows)
        # Row-wise scaling wants an fp32 [M, 1] and an fp32 [1, N] scale, both contiguous: ones and output_scale.
        m = rows.shape[0]
        scale_a = self.unit_rows[:m] if self.unit_rows is not None else torch.ones(m, 1, device=rows.device)
        return torch._scaled_mm(xq, self.weight.t(), scale_a=scale_a, scale_b=self.output_scale, bias=bias,
                                out_dtype=rows.dtype, use_fast_accum=True)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias goes into the GEMM's epilogue (added in fp32 before the one rounding to the output dtype), as
        # torchao's FP8 linear does (cuBLASLt then picks a bias-epilogue kernel).
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = self.matmul(x.reshape(-1, x.shape[-1]), bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


# Separate projections -> the fused linear diffusers' fuse_projections makes of them. They read the same input, so
# their calibrated input amax is the same number.
_FUSED_QKV = {("to_q", "to_k", "to_v"): "to_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"): "to_added_qkv"}


def amax_for_fused_qkv(model: nn.Module, amax: Mapping[str, float]) -> dict[str, float]:
    """``amax`` renamed for ``model`` with fused Q/K/V: each group of three becomes its fused linear (the max of the
    three, which are equal when calibrated on the same input); names whose attention is not fused stay.
    """
    out: dict[str, float] = {}
    for name, value in amax.items():
        parent, _, leaf = name.rpartition(".")
        group = next((g for g in _FUSED_QKV if leaf in g), None)
        attention = model.get_submodule(parent) if parent else model
        if group is None or not getattr(attention, "fused_projections", False):
            out[name] = value
            continue
        fused = f"{parent}.{_FUSED_QKV[group]}" if parent else _FUSED_QKV[group]
        out[fused] = max(out.get(fused, 0.0), value)
    return out


@contextlib.contextmanager
def static_fp8_linears(model: nn.Module, amax: Mapping[str, float], max_rows: int | None = None) -> Iterator[nn.Module]:
    """Swap each ``nn.Linear`` named in ``amax`` (names relative to ``model``) for a ``StaticFp8Linear``; put the
    originals back on exit. With ``max_rows`` (the most rows any of their inputs has) the layers share one buffer of
    ones for their GEMMs' per-row scale.

    Yields:
        ``model``, changed in place for the duration.

    Raises:
        KeyError: a name in ``amax`` that is not an ``nn.Linear`` of ``model``.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    unit_rows: dict[torch.device, torch.Tensor] = {}
    try:
        for name, value in amax.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            original = getattr(parent, child, None)
            if not isinstance(original, nn.Linear):
                raise KeyError(f"{name} is not an nn.Linear of the model ({type(original).__name__})")
            device = original.weight.device
            if max_rows is not None and device not in unit_rows:
                unit_rows[device] = torch.ones(max_rows, 1, device=device)
            setattr(parent, child, StaticFp8Linear(original, value, unit_rows.get(device)))
            swapped.append((parent, child, original))
        yield model
    finally:
        for parent, child, original in reversed(swapped):
            setattr(parent, child, original)
