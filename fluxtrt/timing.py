"""Timing on the device the work runs on: CUDA events (resolved after the work, no sync inside a loop) on a GPU, a
host clock on the CPU. One clock serves the pipeline's per-component times, the first-block cache's per-step times
and the first-call (compile) time of the stages."""

from __future__ import annotations

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
        ms = dict(ms)
        if "total" in ms:
            ms["glue"] = ms["total"] - sum(v for k, v in ms.items() if k != "total")
        return ms
