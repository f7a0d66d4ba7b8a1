"""JSON records for the GPU benchmark scripts: one line per phase on stdout, all of them rewritten to --out each time,
so a run cut short keeps what it measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


class Records:
    """Collects phase records; ``emit`` prints one and rewrites ``out`` with all."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.items: list[dict] = []
        self.t0 = time.perf_counter()

    def emit(self, record: dict) -> None:
        self.add({**record, "t_s": round(time.perf_counter() - self.t0, 1)})

    def add(self, record: dict) -> None:
        """Keep ``record`` as it is (e.g. one a child process emitted)."""
        self.items.append(record)
        print(json.dumps(record), flush=True)
        self.out.write_text(json.dumps(self.items, indent=2))


def step_ms(call, warmup: int = 3, iters: int = 10) -> float:
    """Mean milliseconds of ``call()`` on the GPU (CUDA events around ``iters`` calls after ``warmup``); on a
    machine without CUDA, wall-clock time (for smoke runs)."""
    import torch

    for _ in range(warmup):
        call()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        return (time.perf_counter() - t0) * 1000 / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def relative_error(got, want) -> dict:
    """Relative L2 error, cosine and max abs difference of two tensors (fp32)."""
    import torch

    a, b = got.float().flatten(), want.float().flatten()
    return {
        "rel_l2": ((a - b).norm() / b.norm()).item(),
        "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
        "max_abs": (a - b).abs().max().item(),
        "ref_absmax": b.abs().max().item(),
    }


def busy_and_idle(spans: list[tuple[float, float]]) -> dict:
    """Of kernel ``(start, end)`` intervals in ms: ``span_ms`` from the first start to the last end, ``busy_ms`` the
    time at least one kernel runs (overlapping kernels counted once) and ``idle_ms`` the rest of the span, the time
    the GPU waits between kernels (for launches, for the host, for a synchronisation)."""
    if not spans:
        return {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0}
    ordered = sorted(spans)
    first = end = ordered[0][0]
    busy = 0.0
    for start, stop in ordered:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return {"span_ms": end - first, "busy_ms": busy, "idle_ms": end - first - busy}


def kernel_profile(call, top: int = 12) -> dict:
    """The GPU kernels of one ``call()`` (run it warm): total device ms, how much of the call's span the GPU ran a
    kernel and how much it waited (``busy_and_idle``), every kernel (``all``, for the category table of
    ``benchmarks/kernels.py``), and the ``top`` kernels by device time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    kernels = [{"name": e.key[:200], "ms": e.self_device_time_total / 1000, "calls": e.count} for e in events]
    spans = [
        (e.time_range.start / 1000, e.time_range.end / 1000)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    return {
        "device_ms": sum(k["ms"] for k in kernels),
        **busy_and_idle(spans),
        "kernels": len(kernels),
        "launches": sum(k["calls"] for k in kernels),
        "top": kernels[:top],
        "all": kernels,
    }


def build_then_measure(args, records: Records, build, measure, module: str) -> None:
    """``--phase all|build|measure`` of a build-and-time benchmark: the environment record (versions, GPU, fluxtrt
    commit), then build, then measure in a fresh process (``python -m MODULE``, so load time comes without the
    build's state) whose records are appended to ``records``."""
    from fluxtrt.environment import environment

    records.emit({"phase": "environment", **environment(), "precision": args.precision})
    if args.phase in ("all", "build"):
        build(args, records)
    if args.phase == "all":
        part = args.out.with_suffix(".measure.json")
        cmd = [sys.executable, "-m", module, *sys.argv[1:], "--phase", "measure", "--out", str(part)]
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
        if part.exists():
            for item in json.loads(part.read_text()):
                if item.get("phase") != "environment":  # the same machine as this process's record
                    records.add(item)
            part.unlink()
        if proc.returncode != 0:
            records.emit({"phase": "measure", "returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:]})
        sys.exit(proc.returncode)
    if args.phase == "measure":
        measure(args, records)


def run_build(cmd: list[str], records: Records, out: Path) -> tuple[dict, float, str]:
    """Run a ``fluxtrt build`` command line; on failure record it and exit 1. Returns (out's manifest as JSON, wall
    seconds, the output's last 3000 characters)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    wall = time.perf_counter() - t0
    tail = (proc.stdout + proc.stderr)[-3000:]
    if proc.returncode != 0:
        records.emit({"phase": "build", "ok": False, "returncode": proc.returncode, "wall_s": wall,
                      "command": " ".join(cmd[1:]), "tail": tail})  # fmt: skip
        sys.exit(1)
    return json.loads((out / "manifest.json").read_text()), wall, tail
