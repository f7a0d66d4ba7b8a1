"""The GPU comparison (DESIGN 7): a benchmark matrix run through ``fluxtrt.bench.compare``, as JSON lines.

    PYTHONUNBUFFERED=1 python -m benchmarks.compare_gpu --matrix benchmarks/matrix.toml --out OUTDIR
                       [--set runs=1 --set stages=0,4:fbc=off] [--no-attention-bench]

Prints one JSON line per event (contender start, warmup, timed run, check, contender done) as it happens and
rewrites OUTDIR/report.{json,md,png} after every contender, so a run cut short still leaves what it measured;
OUTDIR/events.jsonl keeps the lines and OUTDIR/command.txt the command. Before the matrix, the attention alone is
timed at the full-size shape (BF16 SDPA against the FP8 kernel stage 2 would use). A contender that fails is one line
in the report; the attention timing or the comparison failing as a whole is one event with a one-line reason, its
traceback in OUTDIR/events.<what>.log.
(``--set model=tiny --set device=cpu --set resolution=64x64`` runs the same script on a CPU in a minute or two.)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

from benchmarks.failures import Logs, Phase, exception_reason

ROOT = Path(__file__).resolve().parents[1]


class Events:
    """JSON lines to stdout (flushed) and to OUTDIR/events.jsonl."""

    def __init__(self, out: Path):
        self.path = out / "events.jsonl"
        self.path.write_text("")
        self.t0 = time.perf_counter()
        self.logs = Logs(self.path)

    def phase(self, name: str) -> Phase:
        """``{"event": name, "status": "failed", "reason": one line, "log": file}`` where the block raises."""
        return Phase(self, self.logs, name, key="event")

    def __call__(self, event: dict) -> None:
        from fluxtrt.bench.report import json_safe

        line = json.dumps(json_safe({"t_s": round(time.perf_counter() - self.t0, 2), **event}), default=str)
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def parse_set(items: list[str]) -> dict:
    """``key=value`` overrides; lists (stages, engines) comma-separated, numbers and booleans parsed."""
    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        if key in ("stages", "engines"):
            out[key] = [v for v in value.split(",") if v]
        elif value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                out[key] = value
    return out


def attention_bench(emit, seq: int = 8704, heads: int = 24, dim: int = 128, iters: int = 20) -> None:
    """BF16 SDPA against the FP8 kernel on one full-size attention ([1, 512 + 4096 + 4096, 24, 128])."""
    import torch
    import torch.nn.functional as F

    from benchmarks.records import step_ms
    from fluxtrt.kernels.attention import check_kernel, fp8_attention_kernel
    from fluxtrt.kernels.fp8 import quantize_fp8_dynamic

    if not torch.cuda.is_available():
        return
    record: dict = {"event": "attention_bench", "shape": [1, seq, heads, dim]}
    q, k, v = (torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def timed(fn) -> float:
        return step_ms(fn, warmup=3, iters=iters)

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with torch.inference_mode():
        record["bf16_sdpa_ms"] = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt))
        try:
            kernel = fp8_attention_kernel("cuda")
            record["fp8_kernel"] = kernel.name
            record["fp8_check_cosine"] = check_kernel(kernel, "cuda")
            q8, dq = quantize_fp8_dynamic(q)
            k8, dk = quantize_fp8_dynamic(k)
            v8, dv = quantize_fp8_dynamic(v)
            # Eager here: in the compiled blocks the quantization and the dequantization fuse with their neighbours.
            record["fp8_kernel_ms"] = timed(lambda: kernel(q8, k8, v8, dq, dk, dv, dim**-0.5))
            if hasattr(torch.ops.fluxtrt, "cudnn_fp8_sdpa") and "cudnn" in kernel.name:
                op = torch.ops.fluxtrt.cudnn_fp8_sdpa
                record["fp8_attention_op_ms"] = timed(lambda: op(q8, k8, v8, dq, dk, dv, dim**-0.5))
            record["fp8_quantize_qkv_ms"] = timed(lambda: [quantize_fp8_dynamic(x) for x in (q, k, v)])
            ref = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).float()
            out = kernel(q8, k8, v8, dq, dk, dv, dim**-0.5).float()
            record["fp8_cosine_full_shape"] = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
        except Exception as exc:  # noqa: BLE001 (reported, and stage 2 will report the same in its row)
            record["fp8_error"] = exception_reason(exc)
            record["fp8_log"] = emit.logs.write("attention_bench-fp8", traceback.format_exc())
    emit(record)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", type=Path, default=ROOT / "benchmarks" / "matrix.toml")
    parser.add_argument("--out", type=Path, required=True, help="Output directory (report and events).")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="Override a matrix key: key=value.")
    parser.add_argument("--no-attention-bench", action="store_true", help="Skip the attention-alone timing.")
    args = parser.parse_args()

    from fluxtrt.bench.compare import compare
    from fluxtrt.bench.matrix import load_matrix

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "command.txt").write_text(shlex.join([sys.executable, *sys.argv]) + "\n")
    emit = Events(args.out)
    config = None
    with emit.phase("matrix") as loaded:
        config = load_matrix(args.matrix, report_dir=args.out, overrides=parse_set(args.sets))
    if loaded.failed:
        emit({"event": "finished", "failed": ["matrix"], "report": None})
        return 1
    if not args.no_attention_bench and config.device == "cuda":
        with emit.phase("attention_bench"):
            attention_bench(emit)
        import torch

        torch.cuda.empty_cache()
    report = None
    with emit.phase("compare") as compared:
        report = compare(config, on_event=emit)
    failed = ["compare"] if compared.failed else [c.name for c in report.failed]
    emit({"event": "finished", "failed": failed, "report": str(args.out / "report.md")})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
