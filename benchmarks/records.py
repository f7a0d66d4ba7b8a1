"""JSON records for the GPU benchmark scripts: one line per phase on stdout, all of them rewritten to --out each time,
so a run cut short keeps what it measured. A phase that fails is one record with a one-line reason (its full output in
a log beside --out) and the phases after it still run (``Records.phase``, benchmarks/failures.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.failures import Logs, Phase, output_reason, run_logged


class Records:
    """Collects phase records; ``emit`` prints one and rewrites ``out`` with all; ``phase`` runs one phase."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.items: list[dict] = []
        self.t0 = time.perf_counter()
        self.logs = Logs(self.out)

    def emit(self, record: dict) -> None:
        self.add({**record, "t_s": round(time.perf_counter() - self.t0, 1)})

    def add(self, record: dict) -> None:
        """Keep ``record`` as it is (e.g. one a child process emitted)."""
        self.items.append(record)
        print(json.dumps(record), flush=True)
        self.out.write_text(json.dumps(self.items, indent=2))

    def phase(self, name: str, key: str = "phase", **fields) -> Phase:
        """``with records.phase("engine"):`` an exception in the block is recorded as ``{"phase": "engine",
        **fields, "status": "failed", "reason": one line, "log": file}`` and the script goes on after the block."""
        return Phase(self.emit, self.logs, name, key, **fields)

    def skip(self, name: str, reason: str, key: str = "phase", **fields) -> None:
        """Record that phase ``name`` did not run (it needs one that failed, or the time ran out): one line."""
        self.emit({key: name, **fields, "status": "skipped", "reason": reason})

    @property
    def failed(self) -> list[str]:
        """The names of the phases that failed so far."""
        names = (r.get("phase") or r.get("part") or r.get("event") for r in self.items if r.get("status") == "failed")
        return [str(n) for n in names]

    def done(self) -> int:
        """Record the end (``{"phase": "done", "failed": [...]}``); the exit status: 1 where a phase failed."""
        failed = self.failed
        self.emit({"phase": "done", "failed": failed})
        return 1 if failed else 0


def step_ms(call, warmup: int = 3, iters: int = 10, device: str = "cuda") -> float:
    """Mean milliseconds of ``call()`` after ``warmup`` calls: for work on CUDA (``device``), CUDA events around
    ``iters`` calls; for work on the CPU or on a machine without CUDA, wall-clock time (for smoke runs)."""
    import torch

    for _ in range(warmup):
        call()
    if not (str(device).startswith("cuda") and torch.cuda.is_available()):
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


def build_then_measure(args, records: Records, build, measure, module: str, argv: list[str] | None = None) -> int:
    """``--phase all|build|measure`` of a build-and-time benchmark: the environment record (versions, GPU, fluxtrt
    commit), then build, then measure in a fresh process (``python -m MODULE``, so load time comes without the
    build's state) whose records are appended to ``records``; a failed build skips the measure. Returns the exit
    status (1 where a phase failed), after a last ``done`` record."""
    from fluxtrt.environment import environment

    argv = sys.argv[1:] if argv is None else argv
    records.emit({"phase": "environment", **environment(), "precision": args.precision})
    if args.phase in ("all", "build"):
        with records.phase("build") as built:
            build(args, records)
        if built.failed and args.phase == "all":
            records.skip("measure", built.blocks())
            return records.done()
    if args.phase == "all":
        part = args.out.with_suffix(".measure.json")
        cmd = [sys.executable, "-m", module, *argv, "--phase", "measure", "--out", str(part)]
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
        finished = False
        if part.exists():
            for item in json.loads(part.read_text()):
                finished = finished or item.get("phase") == "done"
                if item.get("phase") not in ("environment", "done"):  # the machine is this process's; done, below
                    records.add(item)
            part.unlink()
        if not finished:  # the measure process died outside its phases (its records above stand)
            log = records.logs.write("measure", proc.stderr)
            records.emit({"phase": "measure", "status": "failed", "returncode": proc.returncode,
                          "reason": output_reason(proc.stderr, proc.returncode), "log": log})  # fmt: skip
    if args.phase == "measure":
        with records.phase("measure"):
            measure(args, records)
    return records.done()


def run_build(cmd: list[str], records: Records, out: Path) -> tuple[dict, float, str]:
    """Run a ``fluxtrt build`` command line; where it fails, raise ``PhaseFailed`` (one line; the command and its
    whole output in the log). Returns (out's manifest as JSON, wall seconds, the log holding the build's output,
    relative to the records' file)."""
    env = {**os.environ, "COLUMNS": "120"}
    child = run_logged(cmd, records.logs, "build", always=True, env=env)
    child.check(wall_s=child.wall_s, command=" ".join(cmd[1:]))
    return json.loads((out / "manifest.json").read_text()), child.wall_s, child.log
