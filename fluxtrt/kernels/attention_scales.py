"""Static FP8 scales of FLUX attention's Q, K and V (``AttentionAmax``), the bound that makes Q's and K's static
(``qk_amax_bound``), V's calibrated amax as a calibration carries it (``ATTENTION_V``, ``split_calibration``), and
quantization with a static or a dynamic amax."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fluxtrt.kernels.fp8 import FP8_MAX, quantize_fp8_by_inverse, quantize_fp8_dynamic


@dataclass(frozen=True)
class AttentionAmax:
    """Static amax of an attention's Q, K and V (e4m3 scale = amax / 448); None: that tensor's dynamic amax."""

    q: float | None = None
    k: float | None = None
    v: float | None = None


# A calibration's key for an attention's V amax: the attention module's name and this suffix, beside the linears'
# input amax (``fluxtrt.engines.calibrate``).
ATTENTION_V = ".attention_v"


def split_calibration(amax: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """A calibration's amax as (the linears' input amax by linear name, V's amax by attention module name)."""
    linears = {k: v for k, v in amax.items() if not k.endswith(ATTENTION_V)}
    attention_v = {k.removesuffix(ATTENTION_V): v for k, v in amax.items() if k.endswith(ATTENTION_V)}
    return linears, attention_v


# bf16 rounding of the norm's and RoPE's outputs, and cos^2 + sin^2 computed in fp32, stay far inside this.
_BOUND_MARGIN = 1.0 + 2.0**-6


def qk_amax_bound(attn: Any) -> AttentionAmax:
    """Static amax of a FLUX attention's Q and K that no input can exceed (V stays dynamic).

    Q and K are RMS-normed per head (``x / sqrt(mean(x^2) + eps) * w``, so every element is at most ``sqrt(D)``
    times ``max|w|``, D the head size; the text stream's norms count too, its tokens share the tensor) and then
    rotated pairwise by RoPE (a rotation keeps a pair's length, which is at most that bound again). e4m3 is a
    floating-point format: values keep their full precision down to 1/28672 of the scale's amax, so a bound ten
    times above what a tensor reaches still keeps it for values down to 1/2867 of its largest; it quantizes about
    as well as the dynamic amax, needs no pass over the tensor first, and never saturates.

    Raises:
        TypeError: a Q or K norm that is not ``torch.nn.RMSNorm`` (no bound is known for it).
    """
    head = math.sqrt(attn.head_dim)
    q = [attn.norm_q] + ([attn.norm_added_q] if getattr(attn, "norm_added_q", None) is not None else [])
    k = [attn.norm_k] + ([attn.norm_added_k] if getattr(attn, "norm_added_k", None) is not None else [])

    def bound(norms: list[Any]) -> float:
        for norm in norms:
            if not isinstance(norm, torch.nn.RMSNorm):
                raise TypeError(f"no static amax for a {type(norm).__name__} Q/K norm (torch.nn.RMSNorm has one)")
        # A norm without a weight multiplies by 1.
        largest = max(1.0 if n.weight is None else float(n.weight.detach().abs().max()) for n in norms)
        return head * largest * _BOUND_MARGIN

    return AttentionAmax(q=bound(q), k=bound(k))


def static_descale(amax: float, device: Any) -> torch.Tensor:
    """The e4m3 descale of a static ``amax``: fp32 [1, 1, 1, 1] on ``device``."""
    return torch.full((1, 1, 1, 1), amax / FP8_MAX, dtype=torch.float32, device=device)


def quantize_fp8_static_or_dynamic(
    x: torch.Tensor, amax: float | None, descale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as e4m3 with its descale (fp32 [1, 1, 1, 1]): from ``amax`` when given (a constant multiply), else from
    x's own amax. ``descale``: ``amax``'s descale, held already (a compiled graph's constant), to return instead of
    a new one."""
    if amax is None:
        return quantize_fp8_dynamic(x)
    xq = quantize_fp8_by_inverse(x, FP8_MAX / amax)
    return xq, descale if descale is not None else static_descale(amax, x.device)
