"""Ctrl-C that always stops a build.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives. Inside a weakref
callback or a ``__del__`` (torch.export and inductor run many) the exception is printed as "Exception ignored in:
..." and dropped, and the build goes on to its end. While a build runs, SIGINT therefore also sets a flag that the
build checks at every step (``Interrupts.check``), so a dropped KeyboardInterrupt is raised again at the next one.

A process started with SIGINT ignored (a background job of a shell script, ``trap '' INT``, ``nohup``-like
launchers) keeps ignoring it, as Python itself does at startup and as Unix programs do: whoever started it asked
for Ctrl-C at the terminal not to reach it. Such a build is stopped with SIGTERM, or by starting it with SIGINT
handled.
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


def sigint_ignored() -> bool:
    """Whether this process ignores SIGINT (``SIG_IGN``), as it may have been started."""
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@contextlib.contextmanager
def watch_interrupts(once: bool = False, ignored: bool | None = None) -> Iterator[Interrupts]:
    """Record SIGINT for the duration (in the main thread; elsewhere signals cannot be handled and nothing changes).

    The previous handler is put back on leaving. ``once``: see ``Interrupts``. ``ignored``: whether SIGINT stays
    ignored for the duration; None: if it is ignored now (``sigint_ignored``), the process was started that way and
    it stays so. A build worker, which ignores SIGINT between builds of its own accord, passes what its parent did.
    """
    interrupts = Interrupts(once)
    if ignored is None:
        ignored = sigint_ignored()
    if ignored or threading.current_thread() is not threading.main_thread():
        yield interrupts
        return
    previous = signal.signal(signal.SIGINT, interrupts._on_sigint)
    try:
        yield interrupts
    finally:
        # None: the previous handler was not set from Python; Python's own is the closest to it.
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
