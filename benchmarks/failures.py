"""A benchmark phase that fails, as one line: the reason a record carries (bounded, no newline), the full output or
traceback in a log file beside the JSON, and the script going on to its next phase.

    with records.phase("build"):
        ...  # where it raises: {"phase": "build", "status": "failed", "reason": "...", "log": "results.build.log"}
    child = run_logged(cmd, records.logs, "infer")
    if not child.ok:
        raise PhaseFailed(child.reason, child.log, returncode=child.returncode)
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REASON_CHARS = 200  # the longest reason a record carries from an exception's text
# fluxtrt's errors are written as one line that ends in the fix ("...: rebuild with --max-resolution 1024x1088"), and
# name paths: they are kept whole up to this length.
FLUXTRT_REASON_CHARS = 400

_TRACEBACK = "Traceback (most recent call last):"
_RANK = re.compile(r"^\[(?:default)?rank\d+\]:\s?")  # torchrun's prefix of a worker's lines
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Failed|Failure)\b(?::|$)")
_FLUXTRT_ERROR = re.compile(r"^fluxtrt\.errors\.\w+: ")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def one_line(text: str, limit: int = REASON_CHARS) -> str:
    """``text`` as one line of at most ``limit`` characters: whitespace runs (newlines too) as one space, then as many
    whole sentences as fit (``CUDA out of memory. Tried to allocate 2.00 GiB. ...``), else cut at a word, with
    ``...``."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    kept = ""
    for sentence in _SENTENCE_END.split(flat):
        joined = f"{kept} {sentence}" if kept else sentence
        if len(joined) > limit:
            break
        kept = joined
    if kept:
        return kept
    cut = flat[: limit - 3].rsplit(" ", 1)[0] if " " in flat[: limit - 3] else flat[: limit - 3]
    return cut + "..."


def _message(lines: list[str]) -> str:
    """The first non-empty line, with the next where it ends in ``:`` (``backend='inductor' raised:`` says nothing
    without the error that follows)."""
    lines = [line.strip() for line in lines if line.strip()]
    if not lines:
        return ""
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def exception_reason(exc: BaseException) -> str:
    """One line for a record: a ``PhaseFailed``'s reason, a fluxtrt error's message (written as one line already;
    up to ``FLUXTRT_REASON_CHARS``), else ``module.Type: message`` (``torch.OutOfMemoryError: CUDA out of memory.
    Tried to allocate 2.00 GiB. ...``), its first line and as many sentences as fit ``REASON_CHARS``."""
    from fluxtrt.errors import FluxtrtError, first_line

    if isinstance(exc, PhaseFailed):
        return exc.reason
    text = first_line(exc, "")
    if text.endswith(":"):
        text = _message(str(exc).splitlines())
    if isinstance(exc, FluxtrtError) and text:
        return one_line(text, FLUXTRT_REASON_CHARS)
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return one_line(f"{name}: {text}" if text else name)


def output_reason(output: str, returncode: int | None = None) -> str:
    """One line for a child process that failed, from its output: the last ``error:`` line (how fluxtrt reports a
    failure), else the exception line of its last traceback (or the last line naming an exception), else the exit
    status."""
    lines = [_RANK.sub("", line) for line in output.splitlines()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return one_line(errors[-1].removeprefix("error: "), FLUXTRT_REASON_CHARS)
    starts = [i for i, line in enumerate(lines) if line.strip() == _TRACEBACK]
    if starts:
        after = lines[starts[-1] + 1 :]
        # The frames are indented; the exception is the first line after them that is not.
        first = next((i for i, line in enumerate(after) if line.strip() and not line[0].isspace()), None)
        if first is not None:
            line = _message(after[first:])
            if _FLUXTRT_ERROR.match(line):  # its message says all, as the CLI's "error:" line would
                return one_line(_FLUXTRT_ERROR.sub("", line), FLUXTRT_REASON_CHARS)
            return one_line(line)
    named = [i for i, line in enumerate(lines) if _EXCEPTION.match(line.strip())]
    if named:
        return one_line(_message(lines[named[-1] :]))
    if returncode is None:
        return "failed"
    return f"killed by signal {-returncode}" if returncode < 0 else f"exit {returncode}"


class PhaseFailed(Exception):
    """A failure already put in one line (a child process's, say): ``Phase`` records ``reason``, ``log`` and
    ``fields`` as they are."""

    def __init__(self, reason: str, log: str | None = None, **fields):
        super().__init__(reason)
        self.reason, self.log, self.fields = one_line(reason, FLUXTRT_REASON_CHARS), log, fields


class Logs:
    """Full outputs and tracebacks of failed phases, as files beside a JSON file (``results.build.log`` beside
    ``results.json``); ``write`` returns the name relative to the JSON's folder, what a record carries."""

    def __init__(self, beside: Path):
        self.dir, self.stem = Path(beside).parent, Path(beside).stem
        self.names: set[str] = set()

    def write(self, label: str, text: str) -> str:
        base = f"{self.stem}.{re.sub(r'[^A-Za-z0-9_.-]+', '-', label).strip('-') or 'phase'}"
        name, n = f"{base}.log", 2
        while name in self.names:  # a phase that runs more than once (one per stage, per level) keeps every log
            name, n = f"{base}-{n}.log", n + 1
        self.names.add(name)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / name).write_text(text)
        return name


class Phase:
    """A context manager around one phase of a benchmark: an exception in it (not Ctrl-C) is recorded through
    ``emit`` as ``{key: name, **fields, "status": "failed", "reason": one line, "log": file}`` and goes no further,
    so the script runs its next phase; ``failed`` and ``reason`` tell a phase that depends on this one."""

    def __init__(self, emit: Callable[[dict], None], logs: Logs, name: str, key: str = "phase", **fields):
        self.emit, self.logs, self.name, self.key, self.fields = emit, logs, name, key, fields
        self.reason: str | None = None

    @property
    def failed(self) -> bool:
        return self.reason is not None

    @property
    def label(self) -> str:
        """The phase's name and its fields' values (``torch_stage 1:fbc=off``)."""
        return " ".join([self.name, *(str(v) for v in self.fields.values())])

    def blocks(self) -> str:
        """The reason a phase that needs this one is skipped."""
        return f"{self.label} failed"

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        self.reason = exception_reason(exc)
        extra = exc.fields if isinstance(exc, PhaseFailed) else {}
        log = exc.log if isinstance(exc, PhaseFailed) else self.logs.write(self.label, _formatted(exc))
        traceback.clear_frames(tb)  # the failed frames' tensors go now, not at the next phase's first allocation
        _free_device_memory()
        record = {self.key: self.name, **self.fields, **extra, "status": "failed", "reason": self.reason}
        self.emit(record if log is None else {**record, "log": log})
        return True


def _formatted(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _free_device_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


@dataclass
class Child:
    """A finished child process: exit status, its output, wall seconds and its log (None while it succeeded,
    unless asked for)."""

    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    log: str | None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def reason(self) -> str:
        return output_reason(self.stdout + "\n" + self.stderr, self.returncode)

    def check(self, **fields) -> Child:
        """Raise ``PhaseFailed`` (one line, the log, ``fields``) where the process failed; else return it."""
        if not self.ok:
            raise PhaseFailed(self.reason, self.log, returncode=self.returncode, **fields)
        return self


def child_env() -> dict:
    """The environment of a benchmark's child process (``python -m fluxtrt ...``): unbuffered, tables 160 columns
    wide, the repository first on PYTHONPATH and then whatever it already holds (wheels installed beside the system's
    packages)."""
    import os

    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160", "PYTHONPATH": path}


def run_logged(cmd: list[str], logs: Logs, label: str, always: bool = False, **kwargs) -> Child:
    """Run ``cmd`` to the end with its output captured (``subprocess.run``'s ``kwargs``: env, cwd); where it fails
    (or ``always``), its command line and whole output go to a log named after ``label``."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    wall = time.perf_counter() - t0
    log = None
    if always or proc.returncode != 0:
        text = f"$ {shlex.join(cmd)}\n# exit {proc.returncode} after {wall:.1f} s\n# stdout\n{proc.stdout}\n# stderr\n"
        log = logs.write(label, text + proc.stderr)
    return Child(proc.returncode, proc.stdout, proc.stderr, wall, log)
