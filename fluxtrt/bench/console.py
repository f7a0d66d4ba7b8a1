"""Rich output of ``fluxtrt compare``: progress lines as contenders run (stderr), then the summary table and the
report's paths (stdout)."""

from __future__ import annotations

from pathlib import Path

from rich import box
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
    """The summary: per contender its median run's total and transformer ms/step (the rows of report.md and the
    chart), speed-ups per edit and per step, and fidelity."""
    from fluxtrt.bench.results import summary_row

    console = out()
    gpus = report.config.get("gpus", 1)
    split = f", the transformer split over {gpus} processes" if gpus > 1 else ""
    loras = "".join(f", every row with LoRA {Path(lora['file']).name}:{lora['scale']:g}"
                    for lora in report.config.get("loras") or [])  # fmt: skip
    console.print(f"fluxtrt compare: {escape(report.config['model'])} on {report.gpu or 'CPU'}"
                  f"{split}{escape(loras)}", soft_wrap=True)  # fmt: skip
    # Narrow enough for 80 columns: no outer edge, two-line headers, the errors of failed contenders under the
    # table. A name folds onto more lines rather than be cut; numbers never wrap.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("contender", overflow="fold", min_width=10)
    for name in ("steps", "total\nms", "transf.\nms/step", "vs 0\nedit", "vs 0\nstep", "vs 1\nedit", "vs 1\nstep",
                 "PSNR\ndB", "SSIM"):  # fmt: skip
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)

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
            fmt(s["speedup_per_step_vs_0"], ".2f"),
            fmt(s["speedup_vs_1"], ".2f"),
            fmt(s["speedup_per_step_vs_1"], ".2f"),
            fmt(s["psnr_db"], ".2f"),
            fmt(s["ssim"], ".4f"),
            "ok" if c.status == "ok" else "failed",
        )
    console.print(table)
    for c in report.failed:
        console.print(f"[red]failed:[/] {escape(c.name)}: {escape(str(c.error))}", soft_wrap=True)
    if directory is not None:
        console.print(escape(f"wrote {directory / 'report.md'}, report.json and report.png"), soft_wrap=True)
