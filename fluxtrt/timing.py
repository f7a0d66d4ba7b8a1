"""Per-component wall time of an edit: CUDA events on a GPU (no sync inside the loop), a host clock on the CPU."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class ComponentTimer:
    """Accumulates the time spent in named regions and in the whole edit.

    Args:
        device: the torch device the work runs on; CUDA work is timed with events resolved in ``summary``.
    """

    def __init__(self, device: Any):
        import torch

        self._cuda = torch.device(device).type == "cuda"
        self._events: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
        self._host_ms: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def region(self, name: str) -> Iterator[None]:
        """Time the enclosed work as part of ``name``."""
        if self._cuda:
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._host_ms[name] += (time.perf_counter() - t0) * 1e3
        self.calls[name] += 1

    def summary(self) -> dict[str, float]:
        """Milliseconds per region; ``total`` (if timed) and ``glue`` = total minus the named components."""
        if self._cuda:
            import torch

            torch.cuda.synchronize()
            ms = {k: sum(s.elapsed_time(e) for s, e in v) for k, v in self._events.items()}
        else:
            ms = dict(self._host_ms)
        if "total" in ms:
            ms["glue"] = ms["total"] - sum(v for k, v in ms.items() if k != "total")
        return ms
