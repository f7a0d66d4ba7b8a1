"""Rich output for the CLI: step progress and result tables (on stderr, so stdout stays clean)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)

COMPONENT_ORDER = ("clip", "t5", "vae_encoder", "transformer", "vae_decoder", "glue", "total")


@contextmanager
def step_progress() -> Iterator[Callable[[int, int], None]]:
    """A progress bar over denoising steps; yields the ``on_step(done, total)`` callback.

    The bar appears at the first callback, so errors raised while loading are not preceded by an empty bar.
    """
    columns = (TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, console=console, transient=False)
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
        progress.stop()


def print_infer_report(report, out: Path) -> None:
    """Warnings, per-component times and where the image went."""
    result = report.result
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    table = Table(
        title=f"{report.model} on {report.device} ({report.dtype}), {result.target} edit of a "
        f"{result.reference} reference"
    )
    table.add_column("component")
    table.add_column("calls", justify="right")
    table.add_column("ms", justify="right")
    table.add_column("ms/call", justify="right")
    for name in COMPONENT_ORDER:
        if name in result.timings_ms:
            ms, calls = result.timings_ms[name], result.calls.get(name, 0)
            table.add_row(name, str(calls or ""), f"{ms:.1f}", f"{ms / calls:.1f}" if calls else "")
    console.print(table)
    console.print(f"model load {report.load_s:.1f} s; wrote {out} ({result.target.width}x{result.target.height})")
