"""The FP8 attention kernels fluxtrt can run, side by side at the FLUX step's shape: cuDNN's FP8 SDPA
(``fluxtrt::cudnn_fp8_sdpa``) and, where ``flash_attn_interface`` imports, FlashAttention 3's FP8 forward
(``fluxtrt::fa3_fp8_sdpa``), the ops the engines call.

    python benchmarks/fp8_attention_kernels.py --out results.json [--seq 8704] [--heads 24] [--head-dim 128]

Q, K and V are random BF16 [1, S, H, D] quantized to e4m3 with their dynamic per-tensor scales; each kernel gets the
same e4m3 tensors. Per kernel: mean milliseconds of 30 calls after 3 (CUDA events), TFLOP/s (4 S^2 D H per call)
and the relative L2 error of its output against FP32 SDPA on the dequantized e4m3 inputs (the exact result for
what the kernel was given).

Prints one JSON line per phase and rewrites --out after each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import Records, add_attention_shape_arguments, relative_error, step_ms  # noqa: E402


def kernels() -> tuple[dict, str | None]:
    """The FP8 attention kernels importable here, by name, and why FlashAttention 3 is not among them (or None)."""
    from fluxtrt.kernels.attention_ops import CudnnFp8Kernel, FlashAttention3Fp8Kernel

    found = {"cudnn": CudnnFp8Kernel()}
    try:
        import flash_attn_interface  # noqa: F401
    except ImportError as exc:
        return found, f"{type(exc).__name__}: {exc}"
    found["fa3"] = FlashAttention3Fp8Kernel()
    return found, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    add_attention_shape_arguments(parser)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from fluxtrt.environment import environment
    from fluxtrt.kernels.fp8 import quantize_fp8_dynamic

    records = Records(args.out)
    records.emit({"phase": "environment", **environment()})
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (1, args.seq, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    (q8, dq), (k8, dk), (v8, dv) = (quantize_fp8_dynamic(t) for t in (q, k, v))
    scale = args.head_dim**-0.5
    exact = F.scaled_dot_product_attention(
        *((t8.float() * d).transpose(1, 2) for t8, d in ((q8, dq), (k8, dk), (v8, dv))), scale=scale
    ).transpose(1, 2)
    flop = 4 * args.seq**2 * args.head_dim * args.heads
    found, fa3_missing = kernels()
    if fa3_missing:
        records.emit({"phase": "kernel", "kernel": "fa3", "error": fa3_missing})
    for name, kernel in found.items():
        try:
            with torch.inference_mode():
                out = kernel(q8, k8, v8, dq, dk, dv, scale)
                ms = step_ms(lambda kernel=kernel: kernel(q8, k8, v8, dq, dk, dv, scale), iters=30)
            records.emit({"phase": "kernel", "kernel": name, "name": kernel.name, "ms": ms,
                          "tflops": flop / ms / 1e9, "vs_exact": relative_error(out.float(), exact)})  # fmt: skip
        except Exception as exc:  # the other kernel's figures stand; say what failed
            records.emit({"phase": "kernel", "kernel": name, "error": f"{type(exc).__name__}: {str(exc)[:600]}"})


if __name__ == "__main__":
    main()
