"""Rich output of ``fluxtrt compare``: progress lines as contenders run (stderr), then the summary table and the
report's paths (stdout)."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from fluxtrt.console import err, out, print_notices


def print_event(event: dict) -> None:
    """One line per contender start, warmup, timed run and check."""
    console = err()
    kind = event.get("event")
    if kind == "contender":
        console.print(f"[bold]{escape(event['contender'])}[/] ({event['kind']})")
    elif kind == "warmup":
        console.print(f"  warmup {event['i'] + 1}: {event['seconds']:.1f} s")
    elif kind == "run":
        console.print(f"  run {event['run'] + 1}: {event['timings_ms']['total']:.0f} ms, {event['steps']} steps")
    elif kind == "done" and event.get("status") != "ok":
        console.print(f"  [red]failed:[/] {escape(event['error'])}", soft_wrap=True)
    elif kind == "notice":
        print_notices([event["text"]])
    elif kind == "check" and event.get("status") == "ok":
        console.print(f"  diffusers check: stage 0 / diffusers transformer ms per step = {event['ratio']:.4f}")


def print_compare_report(report, directory: Path | None) -> None:
    """The summary: per contender median total, transformer ms/step, speed-ups and fidelity."""
    from fluxtrt.bench.results import summary_row

    console = out()
    gpus = report.config.get("gpus", 1)
    split = f", the transformer split over {gpus} processes" if gpus > 1 else ""
    console.print(f"fluxtrt compare: {escape(report.config['model'])} on {report.environment.get('gpu') or 'CPU'}"
                  f"{split}", soft_wrap=True)  # fmt: skip
    table = Table()
    for name in ("contender", "steps", "total ms", "transformer ms/step", "vs 0", "vs 1", "PSNR dB", "SSIM", "status"):
        table.add_column(name, justify="left" if name in ("contender", "status") else "right")

    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for c in report.contenders:
        s = summary_row(report, c)
        table.add_row(
            escape(c.name),
            fmt(s["steps"], "d"),
            fmt(s["median_total_ms"], ".0f"),
            fmt(s["transformer_ms_per_step"], ".1f"),
            fmt(s["speedup_vs_0"], ".2f"),
            fmt(s["speedup_vs_1"], ".2f"),
            fmt(s["psnr_db"], ".2f"),
            fmt(s["ssim"], ".4f"),
            "ok" if c.status == "ok" else escape(f"failed: {c.error}"),
        )
    console.print(table)
    if directory is not None:
        console.print(escape(f"wrote {directory / 'report.md'}, report.json and report.png"), soft_wrap=True)
