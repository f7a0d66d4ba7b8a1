"""Ctrl-C that always stops a build.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives. Inside a weakref
callback or a ``__del__`` (torch.export and inductor run many) the exception is printed as "Exception ignored in:
..." and dropped, and the build goes on to its end. While a build runs, SIGINT therefore also sets a flag that the
build checks at every step (``Interrupts.check``), so a dropped KeyboardInterrupt is raised again at the next one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Interrupts:
    """Whether SIGINT arrived since ``watch_interrupts`` began.

    Args:
        once: raise KeyboardInterrupt for the first SIGINT only; later ones only keep ``seen`` set, so cleanup that
            runs after the first (a staging folder removed in a ``finally``) is not cut short by a second.
    """

    def __init__(self, once: bool = False) -> None:
        self.seen = False
        self.once = once

    def check(self) -> None:
        """Raise KeyboardInterrupt if SIGINT arrived (even if the first KeyboardInterrupt was swallowed)."""
        if self.seen:
            raise KeyboardInterrupt

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.seen and self.once:
            return
        self.seen = True
        raise KeyboardInterrupt


@contextlib.contextmanager
def watch_interrupts(once: bool = False) -> Iterator[Interrupts]:
    """Record SIGINT for the duration (in the main thread; elsewhere signals cannot be handled and nothing changes).

    The previous handler is put back on leaving. ``once``: see ``Interrupts``.
    """
    interrupts = Interrupts(once)
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return
    previous = signal.signal(signal.SIGINT, interrupts._on_sigint)
    try:
        yield interrupts
    finally:
        # None: the previous handler was not set from Python; Python's own is the closest to it.
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
