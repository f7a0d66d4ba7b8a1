"""The single blocks' largest kernel outside the GEMMs and attention, by hand: the input of the output projection,
``e4m3(cat([attention output, gelu(mlp)]) * inverse_scale)``, as a Triton kernel against inductor's fused kernel
for the same functions, at the 1024x1024 step's shape, one after another on one GPU.

    python benchmarks/gelu_cat.py --out results.json [--tokens 8704]

What the engine computes there (``aoti_fp8_normrope_h200.json``: 0.22 ms a call, 38 calls a step, about 1.7 TB/s):
cuDNN's e4m3 attention output times V's descale, rounded to BF16; the MLP's pre-activation (BF16, [S, 12288])
through the tanh GELU in its sigmoid form (``fluxtrt.kernels.gelu``), rounded to BF16; both concatenated and
quantized with the projection's static scale. The kernel here does the same in one pass over [rows x columns]
tiles (a tile lies wholly in the attention's 3072 columns or in the MLP's), with fluxtrt's exact BF16 and e4m3
roundings (``fluxtrt.kernels.norm_rope_triton``). Each variant: mean milliseconds of 50 calls after 5 (CUDA
events), the bytes it must move over that time, and how many e4m3 values differ from eager PyTorch.

Prints one JSON line per phase and rewrites --out after each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import Records, step_ms  # noqa: E402

# (rows, columns) per program, warps.
CONFIGS = ((1, 1024, 4), (2, 1024, 8), (4, 512, 4), (8, 512, 8), (8, 256, 4), (16, 256, 8))


def reference(o8, descale_v, mlp, inverse_scale):
    """Eager PyTorch: what the engine's graph computes there."""
    import torch

    from fluxtrt.kernels.fp8 import quantize_fp8_by_inverse
    from fluxtrt.kernels.gelu import sigmoid_form_gelu

    attn = (o8.float() * descale_v).to(torch.bfloat16).flatten(2)  # [B, S, H * D]
    joined = torch.cat([attn, sigmoid_form_gelu(mlp)], dim=2)
    return quantize_fp8_by_inverse(joined.reshape(-1, joined.shape[-1]), inverse_scale)


def triton_kernel():
    """The launcher of the kernel below: ``launch(o8, descale_v, mlp, inverse_scale, (rows, columns, warps))``."""
    import triton

    kernel = _kernel()

    def launch(o8, descale_v, mlp, inverse_scale, config):
        import torch

        block_r, block_c, warps = config
        rows, a, m = mlp.shape[0] * mlp.shape[1], o8.shape[2] * o8.shape[3], mlp.shape[2]
        out = torch.empty((rows, a + m), dtype=torch.float8_e4m3fn, device=mlp.device)
        grid = (triton.cdiv(rows, block_r), (a + m) // block_c)
        kernel[grid](o8, descale_v, mlp, out, rows, inverse_scale, A=a, M=m, BLOCK_R=block_r, BLOCK_C=block_c,
                     num_warps=warps)  # fmt: skip
        return out

    return launch


def _kernel():
    """The Triton kernel, defined where triton imports (a jit function resolves its helpers among the module's
    globals, so they are made global here)."""
    import triton
    import triton.language as tl

    from fluxtrt.kernels import norm_rope_triton

    globals().update(tl=tl, _round_bf16=norm_rope_triton._round_bf16, _round_e4m3=norm_rope_triton._round_e4m3)

    @triton.jit
    def gelu_cat_fp8(o_ptr, dv_ptr, mlp_ptr, out_ptr, rows, inverse_scale, A: tl.constexpr, M: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c0 = tl.program_id(1) * BLOCK_C
        c = c0 + tl.arange(0, BLOCK_C)[None, :]
        valid = r < rows
        if c0 < A:
            y = tl.load(o_ptr + r * A + c, mask=valid, other=0.0).to(tl.float32) * tl.load(dv_ptr)
        else:
            x = tl.load(mlp_ptr + r * M + (c - A), mask=valid, other=0.0).to(tl.float32)
            u = 1.5957691216057308 * (x + 0.044715 * x * x * x)  # 2 sqrt(2 / pi) (x + 0.044715 x^3)
            y = x / (1.0 + tl.exp(-u))
        y = _round_bf16(y)  # noqa: F821 (made global above)
        q = _round_e4m3(tl.clamp(y * inverse_scale, -448.0, 448.0)).to(tl.float8e4nv)  # noqa: F821
        tl.store(out_ptr + r * (A + M) + c, q, mask=valid)

    return gelu_cat_fp8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=8704)
    args = parser.parse_args()

    import torch

    from fluxtrt.environment import environment

    records = Records(args.out)
    records.emit({"phase": "environment", **environment()})
    gen = torch.Generator(device="cuda").manual_seed(0)
    s, heads, d, m = args.tokens, 24, 128, 12288
    o8 = (torch.randn(1, s, heads, d, generator=gen, device="cuda") * 100).to(torch.float8_e4m3fn)
    descale_v = torch.full((1, 1, 1, 1), 0.02, device="cuda")
    mlp = torch.randn(1, s, m, generator=gen, device="cuda", dtype=torch.bfloat16) * 2
    inverse_scale = torch.tensor([[448.0 / 8.0]], device="cuda")  # a buffer, as StaticFp8Linear holds it
    moved = s * heads * d * 1 + s * m * 2 + s * (heads * d + m) * 1
    with torch.inference_mode():
        want = reference(o8, descale_v, mlp, inverse_scale)
        compiled = torch.compile(reference, dynamic=False)
        launch = triton_kernel()
        variants = {"inductor": lambda: compiled(o8, descale_v, mlp, inverse_scale)}
        for config in CONFIGS:
            variants["triton {}x{}/{}".format(*config)] = lambda c=config: launch(
                o8, descale_v, mlp, float(inverse_scale), c
            )
        for variant, call in variants.items():
            try:
                got = call()
                differ = int((got.view(torch.uint8) != want.view(torch.uint8)).sum())
                ms = step_ms(call, warmup=5, iters=50)
                records.emit({"phase": "variant", "variant": variant, "ms": ms, "tb_per_s": moved / ms / 1e9,
                              "bytes": moved, "differ": differ, "elements": want.numel()})  # fmt: skip
            except Exception as exc:  # the other variants' figures stand; say what failed
                records.emit({"phase": "variant", "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:600]})


if __name__ == "__main__":
    main()
