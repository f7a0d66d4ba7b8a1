"""FLUX attention's Q or K from its projection to FP8 in one pass: the per-head RMS norm, RoPE and the static e4m3
quantization (``fluxtrt::norm_rope_fp8``).

What ``Fp8FluxAttnProcessor`` computes for Q and K with a static amax, as one registered op: on CUDA one Triton
kernel (``fluxtrt.kernels.norm_rope_triton``) reads the projection's BF16 output once and writes e4m3, where
inductor's kernels for the same chain moved about 1 TB/s (benchmarks/results/README.md); elsewhere the reference
below, diffusers' own functions. The kernel rounds to BF16 where the reference does (the norm's output, RoPE's
output), so both give the same e4m3 values but for fp32 rounding-order ties.

A double block's Q is the text stream's (with its own norm weight) followed by the image stream's: ``x`` and
``x_image`` are normed each with its weight and written one after the other, text first, as the processor
concatenates them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fluxtrt.kernels.fp8 import quantize_fp8_by_inverse


def _normed(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[B, S, H * D] -> RMS-normed per head [B, S, H, D] (``torch.nn.RMSNorm``'s computation)."""
    d = weight.shape[0]
    return F.rms_norm(x.unflatten(-1, (-1, d)), (d,), weight, eps)


def norm_rope_fp8_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    x_image: torch.Tensor | None,
    weight_image: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse_scale: float,
    eps: float,
) -> torch.Tensor:
    """The op by diffusers' functions: RMS norm per stream, text first, RoPE, ``x * inverse_scale`` as e4m3."""
    from diffusers.models.embeddings import apply_rotary_emb

    parts = [_normed(x, weight, eps)]
    if x_image is not None:
        parts.append(_normed(x_image, weight_image, eps))
    y = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return quantize_fp8_by_inverse(apply_rotary_emb(y, (cos, sin), sequence_dim=1), inverse_scale)


# BF16 [B, S, H * D] projection(s) -> e4m3 [B, S (+ S_image), H, D]: RMS norm per head with ``weight`` [D]
# (``weight_image`` for ``x_image``), RoPE with ``cos``/``sin`` [S_total, D], times ``inverse_scale``. The reference is
# its implementation off CUDA.
norm_rope_fp8 = torch.library.custom_op("fluxtrt::norm_rope_fp8", mutates_args=())(norm_rope_fp8_reference)


@norm_rope_fp8.register_kernel("cuda")
def _(x, weight, x_image, weight_image, cos, sin, inverse_scale, eps):
    from fluxtrt.kernels.norm_rope_triton import launch_norm_rope_fp8

    return launch_norm_rope_fp8(x, weight, x_image, weight_image, cos, sin, inverse_scale, eps)


@norm_rope_fp8.register_fake
def _(x, weight, x_image, weight_image, cos, sin, inverse_scale, eps):
    seq = x.shape[1] + (0 if x_image is None else x_image.shape[1])
    d = weight.shape[0]
    return x.new_empty((x.shape[0], seq, x.shape[2] // d, d), dtype=torch.float8_e4m3fn)


def rms_eps(norm: torch.nn.RMSNorm, dtype: torch.dtype) -> float:
    """The epsilon ``norm`` adds for inputs of ``dtype`` (``eps=None`` means the dtype's machine epsilon)."""
    return float(norm.eps) if norm.eps is not None else float(torch.finfo(dtype).eps)


def fusable_norms(attn) -> bool:
    """Whether ``attn``'s Q and K norms are what ``norm_rope_fp8`` computes: ``torch.nn.RMSNorm`` with a weight,
    over the head size, for each stream."""
    names = ("norm_q", "norm_k") + (("norm_added_q", "norm_added_k") if attn.added_kv_proj_dim is not None else ())
    for name in names:
        norm = getattr(attn, name, None)
        if not isinstance(norm, torch.nn.RMSNorm) or norm.weight is None:
            return False
        if tuple(norm.normalized_shape) != (attn.head_dim,):
            return False
    return True
