"""``fluxtrt inspect``'s check of an engines directory: what ``infer --engines`` would find wrong with it, listed
rather than raised, so that one look names every problem."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from fluxtrt.engines.component import STAGING_PREFIX
from fluxtrt.engines.load import transformer_engines
from fluxtrt.engines.lock import LOCK_NAME
from fluxtrt.engines.manifest import HASH_ON_LOAD_LIMIT, FileRecord, Manifest, sha256_file
from fluxtrt.specs.flux import COMPONENTS


def directory_problems(manifest: Manifest, root: Path, full: bool = False) -> list[str]:
    """Every problem of the engines directory ``root`` whose manifest is ``manifest``, one line each (none: it is
    complete and intact): a component not built, a file missing or of another size or sha256 than recorded, a
    tokenizer folder missing, a staging folder an interrupted build left, a build holding the lock.

    Args:
        full: hash every file (``inspect --check``); otherwise files over ``HASH_ON_LOAD_LIMIT`` are checked by size
            alone, as ``infer --engines`` checks them.
    """
    problems = []
    missing = [c for c in COMPONENTS if c != "transformer" and c not in manifest.components]
    if not transformer_engines(manifest, None):  # neither the transformer nor both of its parts
        missing.append("transformer")
    if missing:
        problems.append(f"no engine for {', '.join(missing)}: the build did not finish; run it again to go on")
    for name, entry in manifest.components.items():
        for record in (*entry.onnx, entry.engine, *entry.engine_extra):
            problem = file_problem(record, root, full)
            if problem:
                problems.append(f"{name}: {problem}")
    for folder in ("tokenizer", "tokenizer_2"):
        if not (root / folder).is_dir():
            problems.append(f"{root / folder} is missing: rebuild with --force")
    for leftover in sorted(root.glob(f"{STAGING_PREFIX}*")):
        problems.append(f"{leftover} was left by a build that did not finish: the next build into this directory "
                        "removes it")  # fmt: skip
    holder = lock_holder(root)
    if holder:
        problems.append(f"a build is writing this directory now ({holder}): wait for it to finish")
    return problems


def file_problem(record: FileRecord, root: Path, full: bool) -> str | None:
    """What is wrong with the file ``record`` describes (None: it is as recorded)."""
    path = root / record.path
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if record.bytes is not None and size != record.bytes:
        return f"{path} has {size} bytes but the manifest records {record.bytes} (truncated or replaced)"
    hashed = record.sha256 is not None and (full or size <= HASH_ON_LOAD_LIMIT)
    if hashed and sha256_file(path) != record.sha256:
        return f"{path} does not have the sha256 the manifest records (corrupt or replaced)"
    return None


def lock_holder(root: Path) -> str | None:
    """Who holds ``root``'s build lock (its recorded pid and command), or None when no build holds it."""
    path = root / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError):
                return " ".join(path.read_text().split())[:200] or "a build"
            return "a build"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
