"""Q (or K) from its projection to e4m3 at the FLUX step's shapes: ``fluxtrt::norm_rope_fp8``'s Triton kernel in
each of its launch configurations against inductor's kernels for the same chain (diffusers' RMS norm and RoPE, then
the static quantization, compiled by torch.compile as the engine's whole graph was), one after another on one GPU.

    python benchmarks/norm_rope.py --out results.json [--heads 24] [--head-dim 128]

Shapes, at a 1024x1024 edit of a 1024x1024 reference: a single block's Q (8704 tokens read from the fused Q/K/V
projection, token stride 3 * 3072) and a double block's (512 text tokens and 8192 image tokens from two
projections, text first). Each variant: mean milliseconds of 50 calls after 5 (CUDA events), the bytes it must move
(BF16 in, e4m3 out, cos/sin in fp32) over that time, and how many e4m3 values differ from the eager reference.

Prints one JSON line per phase and rewrites --out after each.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import Records, step_ms  # noqa: E402


def projections(text: int, image: int, heads: int, d: int, seed: int = 0):
    """(text Q or None, its norm weight or None, image Q, its weight, cos, sin) as the processor gets them."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    width = heads * d

    def q(tokens):
        return torch.randn(1, tokens, 3 * width, generator=gen, device="cuda", dtype=torch.bfloat16)[..., :width]

    def weight():
        return torch.rand(d, generator=gen, device="cuda").to(torch.bfloat16) + 0.5

    angles = torch.rand(text + image, d // 2, generator=gen, device="cuda") * 2 * math.pi
    cos, sin = (f(angles).repeat_interleave(2, dim=-1) for f in (torch.cos, torch.sin))
    if text == 0:
        return q(image), weight(), None, None, cos, sin
    return q(text), weight(), q(image), weight(), cos, sin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()

    import torch

    from fluxtrt.environment import environment
    from fluxtrt.kernels.norm_rope import norm_rope_fp8_reference
    from fluxtrt.kernels.norm_rope_triton import CONFIGS, launch_norm_rope_fp8

    records = Records(args.out)
    records.emit({"phase": "environment", **environment()})
    inverse_scale, eps = 448.0 / (math.sqrt(args.head_dim) * 2.0), 1e-6
    compiled = torch.compile(norm_rope_fp8_reference, dynamic=False)
    for name, text, image in (("single block", 0, 8704), ("double block", 512, 8192)):
        inputs = projections(text, image, args.heads, args.head_dim)
        elements = (text + image) * args.heads * args.head_dim
        moved = elements * (2 + 1) + (text + image) * args.head_dim * 4 * 2
        with torch.inference_mode():
            want = norm_rope_fp8_reference(*inputs, inverse_scale, eps)
            variants = {"inductor": lambda inputs=inputs: compiled(*inputs, inverse_scale, eps)}
            for block, warps in CONFIGS:
                variants[f"triton {block}x{warps}"] = lambda inputs=inputs, c=(block, warps): launch_norm_rope_fp8(
                    *inputs, inverse_scale, eps, config=c
                )
            variants["triton autotuned"] = lambda inputs=inputs: launch_norm_rope_fp8(*inputs, inverse_scale, eps)
            for variant, call in variants.items():
                got = call()
                differ = int((got.view(torch.uint8) != want.view(torch.uint8)).sum())
                ms = step_ms(call, warmup=5, iters=50)
                records.emit({"phase": "variant", "shape": name, "variant": variant, "ms": ms,
                              "tb_per_s": moved / ms / 1e9, "bytes": moved, "differ": differ,
                              "elements": elements})  # fmt: skip


if __name__ == "__main__":
    main()
