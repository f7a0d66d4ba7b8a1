"""Why cuDNN's FP8 attention takes longer in the engine's step than alone: the op timed alone, after an FP8 GEMM of
the step's size (the GPU's power and clocks as in the step), and after a write of 256 MB (L2 contents as in the
step, without the GEMM's power), with the SM clock read before and after each series.

    python benchmarks/attention_in_step.py --out results.json [--seq 8704] [--heads 24] [--head-dim 128] [--calls 30]

Each series times ``fluxtrt::cudnn_fp8_sdpa`` alone, between CUDA events around each call, mean of --calls after 3.
Prints one JSON line per series and rewrites --out after each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import Records, add_attention_shape_arguments  # noqa: E402


def sm_clock_mhz() -> int | None:
    import torch

    try:
        return int(torch.cuda.clock_rate())
    except Exception:  # no pynvml / NVML here
        return None


def timed_attention(attention, before, calls: int) -> dict:
    """Mean and min ms of ``attention()`` over ``calls``, each preceded by ``before()`` outside the timed span."""
    import torch

    for _ in range(3):
        before()
        attention()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    clock_before = sm_clock_mhz()
    for start, end in pairs:
        before()
        start.record()
        attention()
        end.record()
    torch.cuda.synchronize()
    ms = [start.elapsed_time(end) for start, end in pairs]
    return {"attention_ms": sum(ms) / len(ms), "min_ms": min(ms), "sm_clock_mhz": [clock_before, sm_clock_mhz()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    add_attention_shape_arguments(parser)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()

    import torch

    import fluxtrt.kernels.attention_ops  # noqa: F401  (registers the op)
    from fluxtrt.environment import environment

    records = Records(args.out)
    records.emit({"phase": "environment", **environment()})
    shape, fp8 = (1, args.seq, args.heads, args.head_dim), torch.float8_e4m3fn
    q, k, v = (torch.randn(shape, device="cuda").to(fp8) for _ in range(3))
    d = torch.full((1, 1, 1, 1), 0.01, device="cuda")

    def attention():
        return torch.ops.fluxtrt.cudnn_fp8_sdpa(q, k, v, d, d, d, args.head_dim**-0.5)

    # As large as a single block's Q/K/V and MLP projections together: [S, 3072] x [3072, 21504], e4m3, BF16 out.
    a = torch.randn(args.seq, 3072, device="cuda").to(fp8)
    b = torch.randn(21504, 3072, device="cuda").to(fp8).t()
    sa, sb = torch.ones(args.seq, 1, device="cuda"), torch.ones(1, 21504, device="cuda")

    def gemm():
        torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True)

    scratch = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    series = {"alone": lambda: None, "after an FP8 GEMM": gemm, "after 256 MB written": lambda: scratch.fill_(1)}
    records.emit({"phase": "setup", "gpu": torch.cuda.get_device_name(), "shape": list(shape)})
    for name, before in series.items():
        records.emit({"phase": "attention", "series": name, **timed_attention(attention, before, args.calls)})


if __name__ == "__main__":
    main()
