"""The Triton kernel behind ``fluxtrt::norm_rope_fp8`` on CUDA (imported only there: it needs triton).

One program normalizes ``BLOCK`` (token, head) rows of D values: it loads them once (BF16, any token and batch
stride, the head's D values contiguous), reduces their mean square, multiplies by rsqrt and the norm weight, rounds
to BF16 as ``torch.nn.RMSNorm`` does, rotates each (even, odd) pair by RoPE's angle for that token, rounds to BF16
as diffusers' ``apply_rotary_emb`` does, and stores ``clamp(y * inverse_scale, +-448)`` as e4m3 (round to nearest
even) into the contiguous [B, S_total, H, D] output at the stream's row offset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fluxtrt.kernels.fp8 import FP8_MAX

# (rows of (token, head) per program, warps) tried by the autotuner once per shape (benchmarks/norm_rope.py, at commit
# f327e00, timed each at the FLUX step's shapes).
CONFIGS = ((16, 4), (32, 4), (32, 8), (64, 8))


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest BF16 value (ties to even), still fp32: integer arithmetic on the bits, exact everywhere
    (Triton's interpreter, which tests this kernel on CPU, truncates its own BF16 conversion)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_e4m3(x):
    """fp32 within +-448 -> the nearest e4m3 value (ties to even), still fp32, so the conversion after is exact:
    normal values keep 3 mantissa bits (integer rounding of the bits, carrying into the exponent), subnormal ones
    (below 2^-6) become multiples of 2^-9 (adding and taking away 1.5 * 2^14, whose ulp that is)."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    size = bits ^ sign
    normal = (size + 0x7FFFF + ((size >> 20) & 1)) & 0xFFF00000
    magic = 1.5 * 16384.0
    subnormal = ((tl.abs(x) + magic) - magic).to(tl.uint32, bitcast=True)
    return (tl.where(size < 0x3C800000, subnormal, normal) | sign).to(tl.float32, bitcast=True)  # 2^-6: 0x3C800000


@triton.jit
def _norm_rope_fp8_kernel(
    x_ptr,
    w_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    rows,
    seq,
    heads,
    x_stride_b,
    x_stride_s,
    out_seq,
    row0,
    inverse_scale,
    eps,
    FP8_LIMIT: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = (r < rows)[:, None]
    h = r % heads
    t = r // heads
    s = t % seq
    b = (t // seq).to(tl.int64)  # offsets in 64 bits: a batch of large images passes 2^31 elements
    d = tl.arange(0, D)[None, :]

    x = tl.load(x_ptr + (b * x_stride_b + s * x_stride_s + h * D)[:, None] + d, mask=valid, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(w_ptr + d).to(tl.float32)
    y = _round_bf16(x * rstd[:, None] * w)

    pos = (row0 + s)[:, None] * D + d
    cos = tl.load(cos_ptr + pos, mask=valid, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos, mask=valid, other=0.0).to(tl.float32)
    even, odd = tl.split(tl.reshape(y, (BLOCK, D // 2, 2)))
    rotated = tl.reshape(tl.join(-odd, even), (BLOCK, D))  # (-x_odd, x_even) per pair, as apply_rotary_emb
    z = _round_bf16(y * cos + rotated * sin)

    q = _round_e4m3(tl.clamp(z * inverse_scale, -FP8_LIMIT, FP8_LIMIT)).to(tl.float8e4nv)
    out = ((b * out_seq + row0 + s) * heads + h)[:, None] * D + d
    tl.store(out_ptr + out, q, mask=valid)


_tuned_kernel = triton.autotune(
    [triton.Config({"BLOCK": block}, num_warps=warps) for block, warps in CONFIGS], key=["rows", "heads", "D"]
)(_norm_rope_fp8_kernel)


def _launch(x, weight, cos, sin, out, row0: int, inverse_scale: float, eps: float, config: tuple[int, int] | None):
    batch, seq, width = x.shape
    d = weight.shape[0]
    heads = width // d
    rows = batch * seq * heads
    args = (x, weight, cos, sin, out, rows, seq, heads, x.stride(0), x.stride(1), out.shape[1], row0, inverse_scale,
            eps)  # fmt: skip
    if config is None:
        _tuned_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK"]),)](*args, FP8_LIMIT=FP8_MAX, D=d)
    else:
        block, warps = config
        _norm_rope_fp8_kernel[(triton.cdiv(rows, block),)](*args, FP8_LIMIT=FP8_MAX, D=d, BLOCK=block, num_warps=warps)


def launch_norm_rope_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    x_image: torch.Tensor | None,
    weight_image: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    inverse_scale: float,
    eps: float,
    config: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``fluxtrt::norm_rope_fp8`` by the Triton kernel (on CPU tensors too under ``TRITON_INTERPRET=1``), with
    ``config`` (rows per program, warps), or the autotuner's pick of ``CONFIGS`` for the shape when None.

    Raises:
        ValueError: a head size that is not a power of two, or cos/sin not [S_total, D].
    """
    d = weight.shape[0]
    if d & (d - 1):
        raise ValueError(f"norm_rope_fp8: head size {d} is not a power of two (the kernel loads a head at once)")
    streams = [(x, weight)] + ([(x_image, weight_image)] if x_image is not None else [])
    total = sum(s.shape[1] for s, _ in streams)
    if tuple(cos.shape) != (total, d) or tuple(sin.shape) != (total, d):
        raise ValueError(f"norm_rope_fp8: cos/sin are {tuple(cos.shape)}, expected ({total}, {d})")
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((x.shape[0], total, x.shape[2] // d, d), dtype=torch.float8_e4m3fn, device=x.device)
    row0 = 0
    for stream, w in streams:
        stream = stream if stream.stride(2) == 1 else stream.contiguous()
        _launch(stream, w.contiguous(), cos, sin, out, row0, inverse_scale, eps, config)
        row0 += stream.shape[1]
    return out
