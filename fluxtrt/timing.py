"""Timing on the device the work runs on: CUDA events (resolved after the work, no sync inside a loop) on a GPU, a
host clock on the CPU. One clock serves the pipeline's per-component times, the first-block cache's per-step times
and the first-call (compile) time of the stages."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def sync() -> None:
    """Wait for the GPU's queued work, where CUDA is in use (a no-op on a CPU-only run)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class EventClock:
    """Labelled intervals: ``start()`` returns a mark, ``stop(label, mark)`` closes an interval, ``resolve()`` gives
    every interval's milliseconds in order (synchronising once, on a GPU).

    Args:
        device: the torch device the timed work runs on.
    """

    def __init__(self, device: Any):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self._pending: list[tuple[str, Any, Any]] = []
        self._done: list[tuple[str, float]] = []

    def start(self) -> Any:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, label: str, start: Any) -> None:
        if self.cuda:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((label, start, end))
        else:
            self._done.append((label, (time.perf_counter() - start) * 1e3))

    def resolve(self) -> list[tuple[str, float]]:
        """(label, ms) of every closed interval so far, in order."""
        if self._pending:
            import torch

            torch.cuda.synchronize()
            self._done += [(label, s.elapsed_time(e)) for label, s, e in self._pending]
            self._pending = []
        return list(self._done)


class ComponentTimer:
    """Accumulates the time spent in named regions and in the whole edit.

    Args:
        device: the torch device the work runs on; CUDA work is timed with events resolved in ``summary``.
    """

    def __init__(self, device: Any):
        self._clock = EventClock(device)
        self.calls: dict[str, int] = defaultdict(int)
        self._skipped: set[str] = set()

    def skip(self, name: str) -> None:
        """Record that ``name`` had nothing to do in this edit (0 ms, no call), e.g. a text encoder whose output was
        reused."""
        self._skipped.add(name)

    @contextmanager
    def region(self, name: str) -> Iterator[None]:
        """Time the enclosed work as part of ``name``."""
        start = self._clock.start()
        yield
        self._clock.stop(name, start)
        self.calls[name] += 1

    def summary(self) -> dict[str, float]:
        """Milliseconds per region; ``total`` (if timed) and ``glue`` = total minus the named components."""
        ms: dict[str, float] = defaultdict(float)
        for name, value in self._clock.resolve():
            ms[name] += value
        for name in self._skipped:
            ms.setdefault(name, 0.0)
        ms = dict(ms)
        if "total" in ms:
            ms["glue"] = ms["total"] - sum(v for k, v in ms.items() if k != "total")
        return ms


class HostLoad:
    """How many CPU cores other processes kept busy while the enclosed work ran (Linux ``/proc``; None elsewhere).

    A CPU timing taken while another process used a core is not comparable with one taken on a quiet machine (on 2
    cores, one busy foreign process made a tiny AOTInductor engine's step 5x slower), so ``compare`` records this
    beside every timed edit. Use as ``with HostLoad() as load: ...``, then ``load.foreign_cores``.
    """

    def __init__(self) -> None:
        self.foreign_cores: float | None = None

    def __enter__(self) -> HostLoad:
        self._start = _cpu_jiffies(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        end = _cpu_jiffies()
        start, wall = self._start[0], time.perf_counter() - self._start[1]
        if start is None or end is None or wall <= 0:
            return
        busy, own = end[0] - start[0], end[1] - start[1]
        self.foreign_cores = max(busy - own, 0) / os.sysconf("SC_CLK_TCK") / wall


def _cpu_jiffies() -> tuple[int, int] | None:
    """(jiffies every CPU spent busy, jiffies this process spent) from /proc, or None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        idle = int(fields[3]) + int(fields[4])  # idle + iowait
        busy = sum(int(f) for f in fields[:8]) - idle  # user..steal, guest is counted in user already
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return busy, int(own[11]) + int(own[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None
