"""An FP8 GEMM with the MLP's GELU and the next layer's e4m3 quantization after it, compiled three ways: inductor's
default (cuBLASLt's GEMM, then one fused pointwise kernel that reads its BF16 output back), and inductor's
max-autotune, which may pick one of its Triton GEMM templates instead and fuse the pointwise work into its
epilogue (no BF16 round trip through memory), with and without its persistent TMA templates; and with those
templates alone (``triton_tma``: cuBLASLt left out, so what the fused template costs).

    python benchmarks/gemm_epilogue.py --out results.json [--rows 8192] [--variants default,autotune_tma,autotune]

The function is the double blocks' ``ff.net[0]`` at a 1024x1024 edit of a 1024x1024 reference: [rows, 3072] e4m3
times [3072, 12288] e4m3 with the engine's scales (ones per row, one per column), the bias, the tanh GELU in its
sigmoid form (``fluxtrt.kernels.gelu``), then ``e4m3(y * inverse_scale)`` (``fluxtrt.kernels.fp8``). The persistent
TMA templates take no bias in the GEMM, so ``autotune_tma`` adds it after (inductor fuses it into the epilogue).
Each variant: mean milliseconds of 50 calls after 5 (CUDA events), whether the compiled code calls cuBLASLt
(``extern_kernels._scaled_mm``) or a Triton template, and how many e4m3 outputs differ from eager PyTorch.

Prints one JSON line per phase and rewrites --out after each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import Records, step_ms  # noqa: E402

VARIANTS = ("default", "autotune_tma", "autotune", "triton_tma")


def up_gelu_quantize(xq, weight, unit_rows, column_scale, bias, inverse_scale, bias_after: bool = False):
    """e4m3(gelu(xq @ weight.T * scales + bias) * inverse_scale), the bias in the GEMM or after it."""
    import torch

    from fluxtrt.kernels.fp8 import quantize_fp8_by_inverse
    from fluxtrt.kernels.gelu import sigmoid_form_gelu

    y = torch._scaled_mm(xq, weight.t(), scale_a=unit_rows, scale_b=column_scale,
                         bias=None if bias_after else bias, out_dtype=torch.bfloat16, use_fast_accum=True)  # fmt: skip
    if bias_after:
        y = y + bias
    return quantize_fp8_by_inverse(sigmoid_form_gelu(y), inverse_scale)


def inductor_configs(variant: str) -> dict:
    """The inductor options of a variant (``step_levers.py``'s ``+autotune`` and ``+tma`` are ``autotune`` and
    ``autotune_tma``)."""
    if variant == "default":
        return {}
    backends = "TRITON" if variant == "triton_tma" else "ATEN,TRITON"
    configs = {"max_autotune_gemm": True, "max_autotune_gemm_backends": backends}
    if variant.endswith("_tma"):
        configs["triton.enable_persistent_tma_matmul"] = True
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=8192, help="image tokens of a double block at 1024x1024")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run of 'default'")
    args = parser.parse_args()

    import torch
    from torch._inductor.utils import run_and_get_code

    from fluxtrt.environment import environment

    records = Records(args.out)
    records.emit({"phase": "environment", **environment()})
    torch.manual_seed(0)
    fp8, dev = torch.float8_e4m3fn, args.device
    xq = (torch.randn(args.rows, 3072, device=dev) * 100).clamp(-448, 448).to(fp8)
    weight = (torch.randn(12288, 3072, device=dev) * 100).clamp(-448, 448).to(fp8)
    unit_rows = torch.ones(args.rows, 1, device=dev)
    column_scale = torch.full((1, 12288), 1e-4, device=dev)
    bias = (torch.randn(12288, device=dev) * 0.1).to(torch.bfloat16)
    inverse_scale = torch.tensor([[60.0]], device=dev)
    inputs = (xq, weight, unit_rows, column_scale, bias, inverse_scale)
    want = up_gelu_quantize(*inputs)
    records.emit({"phase": "setup", "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                  "shape": [args.rows, 3072, 12288]})  # fmt: skip

    for variant in args.variants.split(","):
        torch._dynamo.reset()
        bias_after = variant.endswith("_tma")
        try:
            with torch._inductor.config.patch(inductor_configs(variant)):
                compiled = torch.compile(lambda *a, b=bias_after: up_gelu_quantize(*a, bias_after=b), fullgraph=True)
                got, code = run_and_get_code(compiled, *inputs)
            source = "\n".join(code)
            ms = step_ms(lambda c=compiled: c(*inputs), warmup=5, iters=50)
            records.emit({
                "phase": "variant", "variant": variant, "ms": ms,
                "cublaslt": "extern_kernels._scaled_mm" in source, "triton_template": "triton_tem_" in source,
                "kernels": source.count("@triton.jit"),
                "e4m3_differing": int((got.float() != want.float()).sum()), "of": want.numel(),
            })  # fmt: skip
        except Exception as exc:  # the other variants' figures stand; say what failed
            records.emit({"phase": "variant", "variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:600]}"})


if __name__ == "__main__":
    main()
