"""One build at a time per engines directory: ``DIR/.lock``, held with ``flock`` while a build runs.

The lock file names its holder (pid, host, start time, command), so a second build says who it is waiting for. The
kernel releases a ``flock`` when its process dies however it dies, so a lock file left by a killed build is simply
taken over (and the build says so). The file starts with a dot: the directory checks that ignore dot files
(``_previous_manifest``'s "not empty") ignore it too, and it is removed when the build ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fluxtrt.errors import EngineError

LOCK_NAME = ".lock"


def _holder_text(info: dict) -> str:
    if not info:
        return "it has not written its pid yet"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if "started" in info else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {started}: {info.get('command', '?')}"


def _read_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _open_locked(path: Path, out: Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock.

    Raises:
        EngineError: another process holds it.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EngineError(
                f"--out '{out}' is being built by another fluxtrt build ({_holder_text(_read_info(path))}): wait "
                f"for it to finish, or build into another --out (it holds {path})"
            ) from None
        # The holder before us may have removed the file between our open and our lock: then the lock we hold is
        # on a file no one else can see; open the path again.
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def build_lock(out: Path, say: Callable[[str, str], None]) -> Iterator[None]:
    """Hold ``out/.lock`` for the duration, creating ``out`` if needed.

    On leaving, the lock file is removed, and so are the folders this call created if nothing else was put in them.

    Args:
        out: the engines directory.
        say: progress callback ``(topic, message)``; told when a dead build's lock is taken over.

    Raises:
        EngineError: another build holds the lock (the message names its pid, host, start time and command), or
            ``out`` cannot be created or written.
    """
    created = []
    folder = out.absolute()
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    path = out / LOCK_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path, out)
    except OSError as exc:
        _remove_empty(created)
        raise EngineError(
            f"--out '{out}' cannot be written ({exc.strerror or exc}): pick a directory you can create and write to"
        ) from None
    except BaseException:
        _remove_empty(created)
        raise
    try:
        left = _read_info(path)
        if left:
            say("lock", f"took over {path}, left by a build that is no longer running ({_holder_text(left)})")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": _command()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        _remove_empty(created)


def _command() -> str:
    """The command line of this process, with ``python -m fluxtrt`` shown as ``fluxtrt``."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return " ".join(["fluxtrt" if program == "__main__.py" else program, *sys.argv[1:]])


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()
