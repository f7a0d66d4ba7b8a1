"""The FP8 (float8_e4m3fn) format as fluxtrt uses it: one owner of its largest value and of quantization.

Static (calibrated) scales: ``quantize_fp8(x, scale)`` with ``scale = amax / 448``, or, in compiled engines,
``quantize_fp8_by_inverse(x, 1 / scale)`` (a multiply where the scale is known ahead: one fewer reciprocal per
element in the fused kernel). Dynamic per-tensor scales (FP8 attention's Q/K/V): ``quantize_fp8_dynamic(x)``. All
round to nearest even and saturate at +-448.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 in fp32 (the scale that maps amax to the largest finite E4M3 value)."""
    return amax.float() / FP8_MAX


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` / ``scale`` (broadcast against x) as float8_e4m3fn, saturating at +-448, rounded to nearest even."""
    return torch.clamp(x.float() / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_fp8_by_inverse(x: torch.Tensor, inverse_scale: torch.Tensor | float) -> torch.Tensor:
    """``x * inverse_scale`` as float8_e4m3fn, saturating at +-448: ``quantize_fp8(x, 1 / inverse_scale)`` with the
    division done once, ahead (the product differs from the quotient by at most an fp32 rounding, far below e4m3's
    3-bit mantissa)."""
    return torch.clamp(x.float() * inverse_scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_fp8_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor dynamic FP8: ``x ~= x8.float() * descale``; descale is fp32 [1, 1, 1, 1] on x's device."""
    scale = fp8_scale(x.detach().abs().amax().float().clamp_min(1e-12))
    return quantize_fp8(x, scale), scale.reshape(1, 1, 1, 1)


def fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [out, in] in the static FP8 scheme: (float8_e4m3fn values, fp32 scale per output channel [out, 1]).

    An all-zero row gets scale 1 (any scale gives zeros).
    """
    w = weight.detach().float()
    scale = fp8_scale(w.abs().amax(dim=1, keepdim=True))
    scale = torch.where(scale > 0, scale, 1.0)
    return quantize_fp8(w, scale), scale
