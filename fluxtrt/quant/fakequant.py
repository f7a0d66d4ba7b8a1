"""PyTorch fake-quant reference of the engines' quantization schemes: the oracle the Q/DQ ONNX is checked against.

Static FP8 (DESIGN 5), as TensorRT's strongly typed FP8 path reads QuantizeLinear/DequantizeLinear:
    activation: one scale per tensor, s_x = amax_x / 448 (amax from calibration);
    weight: one scale per output channel, s_w[o] = max_i |W[o, i]| / 448;
    q(x, s) = float8_e4m3fn(clamp(x / s, -448, 448)) (round to nearest even, saturating), dq(q, s) = q * s.

NVFP4 (NVIDIA's two-level scaling: FP4 E2M1 values, one FP8 E4M3 scale per block of 16, one FP32 global scale):
    global scale g = amax / (6 * 448); block scale b = float8_e4m3fn((block_amax / 6) / g);
    q = e2m1(x / (b * g)) (round to nearest even, saturating at 6), dq = q * b * g.
    Weights: blocks of 16 along the input dimension, amax = max |W| (static).
    Activations: TensorRT's FP4 recipe on Blackwell (ModelOpt's NVFP4 ONNX export, the ``TRT_FP4DynamicQuantize``
    op that TensorRT's ONNX parser reads): block scales computed at run time from each block of 16 along the last
    axis, the global scale static, from the calibrated amax (g_x = amax_x / (6 * 448)).
"""

from __future__ import annotations

import torch
from torch import nn

from fluxtrt.kernels.fp8 import FP8_MAX, fp8_scale, fp8_weight, quantize_fp8

FP4_MAX = 6.0
FP4_BLOCK = 16
# E2M1 magnitudes by code 0..7; midpoints between neighbours decide rounding.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize ``x`` to float8_e4m3fn with ``scale`` (broadcast against x) and dequantize, in fp32."""
    return quantize_fp8(x, scale).float() * scale


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``x`` to the nearest FP4 E2M1 value (ties to even code, saturating at +-6)."""
    values = torch.tensor(_E2M1, dtype=torch.float32, device=x.device)
    mids = (values[1:] + values[:-1]) / 2
    mag = x.abs().clamp(max=FP4_MAX)
    lo = torch.bucketize(mag, mids, right=False)  # at a midpoint: the lower code
    hi = torch.bucketize(mag, mids, right=True)  # at a midpoint: the upper code
    code = torch.where((lo != hi) & (lo % 2 == 1), hi, lo)
    return torch.sign(x) * values[code]


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """The FP32 per-tensor scale of NVFP4: amax / (6 * 448)."""
    return amax.float() / (FP4_MAX * FP8_MAX)


def fake_quant_nvfp4(x: torch.Tensor, global_scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """NVFP4 quantize/dequantize of ``x`` in blocks of ``block`` along the last axis, in fp32."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // block, block)  # [..., K/16, 16]
    block_amax = xb.abs().amax(dim=-1, keepdim=True)
    b = torch.clamp(block_amax / FP4_MAX / global_scale, max=FP8_MAX).to(torch.float8_e4m3fn).float()
    s = b * global_scale
    q = torch.where(s > 0, round_e2m1(xb / torch.where(s > 0, s, 1.0)), 0.0)
    return (q * s).reshape(shape)


class FakeQuantLinear(nn.Module):
    """An ``nn.Linear`` computed as the quantized engine computes it (fake quantization, fp32 math).

    Args:
        linear: the layer to wrap (its weight and bias are read, not changed).
        scheme: ``fp8`` (static per-tensor activation, per-channel weight) or ``fp4`` (NVFP4).
        input_amax: the calibrated amax of the layer's input.
    """

    def __init__(self, linear: nn.Linear, scheme: str, input_amax: float | torch.Tensor):
        super().__init__()
        if scheme not in ("fp8", "fp4"):
            raise ValueError(f"scheme is '{scheme}', expected fp8 or fp4")
        self.scheme = scheme
        self.bias = linear.bias
        amax = torch.as_tensor(input_amax, dtype=torch.float32, device=linear.weight.device)
        if scheme == "fp8":
            self.register_buffer("input_scale", fp8_scale(amax))
            weight_q, weight_scale = fp8_weight(linear.weight)
            self.register_buffer("weight_q", weight_q)  # [out, in] float8_e4m3fn
            self.register_buffer("weight_scale", weight_scale)  # [out, 1] fp32
        else:
            w = linear.weight.detach().float()  # [out, in]
            self.register_buffer("input_scale", nvfp4_global_scale(amax))
            self.register_buffer("weight_dq", fake_quant_nvfp4(w, nvfp4_global_scale(w.abs().amax())))

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as the engine sees it, in fp32."""
        if self.scheme == "fp8":
            return self.weight_q.float() * self.weight_scale
        return self.weight_dq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant = fake_quant_fp8 if self.scheme == "fp8" else fake_quant_nvfp4
        xq = quant(x, self.input_scale)
        y = xq @ self.dequantized_weight().T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def fake_quantize(model: nn.Module, amax: dict[str, float], scheme: str) -> nn.Module:
    """Replace each ``nn.Linear`` named in ``amax`` (names from ``model.named_modules()``) by a FakeQuantLinear.

    Changes ``model`` in place and returns it; pass a copy to keep the original.
    """
    for name, value in amax.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FakeQuantLinear(getattr(parent, child), scheme, value))
    return model
