"""Atomic file writes: a reader never sees a half-written file under the final name; and a check, before any work,
that a file can be written where the user asked for it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from fluxtrt.errors import InputError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    If ``write`` raises, the temporary file is removed and ``path`` (if it existed) is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: Path, option: str) -> None:
    """Raise InputError unless a file can be created at ``path``.

    The nearest existing ancestor of ``path`` must be a directory in which a file can be created (missing folders
    below it are created when the file is written). A probe file is created there and removed at once: permission
    bits alone do not tell (root ignores them, a read-only mount does not show in them).

    Args:
        path: the file to be written.
        option: the option that named it, for the message (``--out``).
    """
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(
            f"{option} '{path}' cannot be written: '{ancestor}' is a file, not a directory; pick a path inside a "
            "directory"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".fluxtrt-probe-", dir=ancestor)
    except OSError as exc:
        raise InputError(
            f"{option} '{path}' cannot be written: no file can be created in '{ancestor}' ({exc.strerror}); pick a "
            "directory you can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)
