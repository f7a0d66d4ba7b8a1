"""Rich output for the CLI, the Unix way: results (tables, what was written, inspect's manifest) on stdout, progress,
logs and notices on stderr, so ``fluxtrt inspect DIR > info.txt`` keeps the tables and a pipe keeps only results.

Written to a terminal, tables fit its width; written to a file or a pipe, they are as wide as their content
(``PIPED_WIDTH`` at most), so no name is cut to "engine…".
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

PIPED_WIDTH = 1000


def _console(stream: TextIO) -> Console:
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=stream, width=None if tty else PIPED_WIDTH)


def out() -> Console:
    """The console of results: stdout, as it is now (the CLI's test runner swaps it)."""
    return _console(sys.stdout)


def err() -> Console:
    """The console of progress, logs and notices: stderr."""
    return _console(sys.stderr)


COMPONENT_ORDER = ("clip", "t5", "vae_encoder", "transformer", "vae_decoder", "glue", "total")


@contextmanager
def step_progress() -> Iterator[Callable[[int, int], None]]:
    """A progress bar over denoising steps, with the time spent and the time left; yields the ``on_step(done, total)``
    callback.

    The bar appears at the first callback, so errors raised while loading are not preceded by an empty bar.
    """
    columns = (TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("left"),
               TimeRemainingColumn())  # fmt: skip
    progress = Progress(*columns, console=err(), transient=False)
    task = None

    def on_step(done: int, steps: int) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task("denoise", total=steps)
        progress.update(task, completed=done)

    try:
        yield on_step
    finally:
        if task is not None:  # an unstarted Progress still prints an empty line when it stops
            progress.stop()


def print_notices(notices: list[str]) -> None:
    """One ``notice:`` line each on stderr (markup in the text is printed as it is)."""
    console = err()
    for notice in notices:
        console.print(f"[yellow]notice:[/] {escape(notice)}", soft_wrap=True)


def print_infer_report(report, path: Path) -> None:
    """Notices on stderr; per-component times and where the image went on stdout."""
    result = report.result
    print_notices(result.warnings)
    console = out()
    console.print(escape(f"{report.model} on {report.device} ({report.dtype}): {result.target} edit of a "
                         f"{result.reference} reference"), soft_wrap=True)  # fmt: skip
    table = Table()
    table.add_column("component")
    table.add_column("calls", justify="right")
    table.add_column("ms", justify="right")
    table.add_column("ms/call", justify="right")
    for name in COMPONENT_ORDER:
        if name in result.timings_ms:
            ms, calls = result.timings_ms[name], result.calls.get(name, 0)
            table.add_row(name, str(calls or ""), f"{ms:.1f}", f"{ms / calls:.1f}" if calls else "")
    console.print(table)
    cache = report.cache
    if cache is not None:
        threshold = "off" if report.fbc_threshold is None else f"{report.fbc_threshold:g}"
        ms = " / ".join(f"{v:.1f}" if v is not None else "-" for v in (cache.mean_computed_ms, cache.mean_skipped_ms))
        line = (f"first-block cache (threshold {threshold}): {cache.computed} steps computed, {cache.skipped} "
                f"skipped; ms per computed / skipped step {ms}")  # fmt: skip
        console.print(escape(line), soft_wrap=True)
    console.print(escape(f"model load {report.load_s:.1f} s; wrote {path} ({result.target})"), soft_wrap=True)


@contextmanager
def build_progress(notices: list[str] | None = None) -> Iterator[Callable[[str, str], None]]:
    """``notices`` (``print_notices``), then a live status line per build step; yields the
    ``on_progress(component, message)`` callback."""
    print_notices(notices or [])
    console = err()
    with console.status("starting build") as status:

        def on_progress(component: str, message: str) -> None:
            status.update(f"[bold]{component}[/]: {escape(message)}")
            # A time and the text, unwrapped (console.log would pad each line to the console's width).
            console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {component}: {escape(message)}", soft_wrap=True)

        yield on_progress


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _onnx_mb(n: int) -> str:
    return _mb(n) if n else "-"  # "-": the backend reads no ONNX (AOTInductor), not an empty file


def print_build_report(report) -> None:
    """Per component: built or up to date, seconds, ONNX and engine sizes; a quantized build's calibration first."""
    m = report.manifest
    console = out()
    console.print(escape(f"{report.out}: {m.backend} {m.backend_version}, {m.precision}, {m.model.source}"),
                  soft_wrap=True)  # fmt: skip
    table = Table()
    for col in ("component", "status", "seconds", "ONNX MiB", "engine MiB"):
        table.add_column(col, justify="left" if col in ("component", "status") else "right")
    no_engine = m.backend == "onnx"  # an ONNX-only directory: the ONNX is all there is
    calibration = getattr(report, "calibration", None)
    for r in [calibration, *report.results] if calibration else report.results:
        engine = "-" if no_engine or not r.engine_bytes else _mb(r.engine_bytes)  # "-": no engine (calibration)
        table.add_row(r.name, r.status, f"{r.seconds:.1f}", _onnx_mb(r.onnx_bytes), engine)
    console.print(table)


def print_problems(problems: list[str]) -> None:
    """``inspect``'s verdict on stderr: each problem as an ``error:`` line (nothing for an intact directory)."""
    console = err()
    for problem in problems:
        console.print(f"[red]error:[/] {escape(problem)}", soft_wrap=True, highlight=False)


def print_manifest(m, root: Path) -> None:
    """``fluxtrt inspect``: the manifest as tables."""
    console = out()
    console.print(escape(str(root)), soft_wrap=True)
    head = Table(show_header=False)
    head.add_column()
    head.add_column()
    rows = [
        ("backend", f"{m.backend} {m.backend_version}"),
        ("precision", m.precision),
        ("model", f"{m.model.source} (fingerprint {m.model.fingerprint})"),
        ("resolutions", str(m.resolutions)),
        ("batch", str(m.batch)),
        ("built on", ", ".join(f"{k} {v}" for k, v in m.build_env.to_json().items())),
        ("fluxtrt", m.fluxtrt_version),
        ("calibration", m.calibration or "none"),
    ]
    for k, v in rows:
        head.add_row(k, v)
    console.print(head)
    table = Table(title="components")
    for col in ("component", "engine", "MiB", "ONNX MiB", "build s", "input shapes (min / opt / max)"):
        table.add_column(col)
    for name, e in m.components.items():
        shapes = "\n".join(f"{k}: " + " / ".join("x".join(map(str, s)) for s in v) for k, v in e.profile.items())
        onnx_mb = _onnx_mb(sum(f.size for f in e.onnx))
        engine_mb = _mb(sum(f.size for f in (e.engine, *e.engine_extra)))
        table.add_row(name, e.engine.path, engine_mb, onnx_mb, f"{e.build_s:.1f}", shapes)
    console.print(table)
    rows = {name: {**e.settings.get("options", {}), **dict(e.record.items())} for name, e in m.components.items()}
    if any(rows.values()):
        # Per engine: the backend options it was built with, then what the backend recorded (kernels chosen, what
        # the engine is tied to).
        table = Table(title="engine settings and record")
        for col in ("component", "key", "value"):
            table.add_column(col, overflow="fold")  # kernel names are long: wrap, never cut
        for name, items in rows.items():
            for i, (key, value) in enumerate(items.items()):
                table.add_row(name if i == 0 else "", key, _option_text(value))
        console.print(table)


def print_trtexec_commands(m) -> None:
    """For an ONNX-only directory (``--backend onnx``): the ``trtexec`` command that builds each component's engine
    with fluxtrt's profiles, run from inside the directory."""
    # Only the onnx backend's records hold a trtexec command.
    commands = [(name, getattr(e.record, "trtexec", None)) for name, e in m.components.items()]
    commands = [(name, command) for name, command in commands if command]
    if not commands:
        return
    console = out()
    console.print("build the engines with TensorRT 10 (run inside the directory), or with `fluxtrt build --backend "
                  "tensorrt --onnx-dir DIR/onnx`:", soft_wrap=True)  # fmt: skip
    for name, command in commands:
        console.print(f"# {name}\n{command}", soft_wrap=True, highlight=False)


def _option_text(value) -> str:
    if isinstance(value, dict):  # e.g. dims: {"S": [2048, 19208]} -> "S 2048..19208"
        return ", ".join(f"{k} {'..'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    return str(value)
