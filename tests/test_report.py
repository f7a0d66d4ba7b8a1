"""`compare`'s outputs agree: the same median row (for odd and even run counts) on stdout, in report.md, in
report.json and on the chart; per-edit and per-step speed-ups; names never cut at 80 columns."""

from __future__ import annotations

import io
import json
import re
import statistics

import pytest
from rich.console import Console

from fluxtrt.bench.results import CompareReport, ContenderResult, RunRecord

PARTS = ("clip", "t5", "vae_encoder", "transformer", "vae_decoder", "glue")
LONG = "engines:aoti-fp8-h100-external-weights"


def run(i: int, steps: int, transformer: float, rest: float = 40.0) -> RunRecord:
    ms = {"clip": 3.0, "t5": 7.0, "vae_encoder": rest, "transformer": transformer, "vae_decoder": 2 * rest, "glue": 1.5}
    return RunRecord(i, steps, {**ms, "total": sum(ms.values())})


def report() -> CompareReport:
    """Stage 0 with an even count of runs (two middle runs far apart), engines with an odd count at half the steps,
    and a failed contender."""
    runs = [run(0, 28, 29000.0), run(1, 28, 72500.0), run(2, 28, 30000.0), run(3, 28, 90000.0)]
    stage0 = ContenderResult("0", "stage", "0", what=["eager"], sampler="euler/flux/28", runs=runs)
    engines = ContenderResult(LONG, "engines", None, what=["engines"], sampler="dpm/flux/14",
                              runs=[run(0, 14, 2600.0), run(1, 14, 2500.0), run(2, 14, 9000.0)])  # fmt: skip
    failed = ContenderResult("4:compile=off:attention=sdpa,quant=fp8", "stage", "4", status="failed", error="boom")
    config = {"model": "tiny", "dtype": "fp32", "runs": 4, "warmup": 1, "warmup_steps": 1}
    inputs = {"image_size": "64x64", "image": "synthetic", "prompt": "p", "seed": 0, "target": "64x64"}
    return CompareReport(config=config, environment={"cpu": "x86_64"}, inputs=inputs,
                         contenders=[stage0, engines, failed])  # fmt: skip


def median_run(c: ContenderResult) -> RunRecord:
    """The lower median by total, found here independently of the code under test."""
    totals = [r.timings_ms["total"] for r in c.runs]
    low = statistics.median_low(totals)
    return next(r for r in c.runs if r.timings_ms["total"] == low)


def stdout_table(rep: CompareReport, width: int, monkeypatch) -> str:
    import fluxtrt.bench.console as bench_console

    buffer = io.StringIO()
    monkeypatch.setattr(bench_console, "out", lambda: Console(file=buffer, width=width))
    bench_console.print_compare_report(rep, None)
    return buffer.getvalue()


def test_every_output_shows_the_same_median_row_for_odd_and_even_runs(tmp_path, monkeypatch):
    from fluxtrt.bench.chart_pillow import _font, chart_layout
    from fluxtrt.bench.report import report_json, report_markdown, write_report

    rep = report()
    stage0, engines = rep.contenders[0], rep.contenders[1]
    m0, me = median_run(stage0), median_run(engines)
    assert (m0.run, me.run) == (2, 0)  # totals 30.1k of (29.1k, 30.1k, 72.6k, 90.1k); 2.7k of (2.6k, 2.7k, 9.1k)
    t0, te = m0.timings_ms["total"], me.timings_ms["total"]

    data = report_json(rep, "pillow")
    rows = {c["contender"]: c for c in data["contenders"]}
    for c, m in ((stage0, m0), (engines, me)):
        row = rows[c.name]
        assert row["median_total_ms"] == m.timings_ms["total"] and row["representative_run"] == m.run
        assert row["components_ms"] == m.timings_ms
        assert row["transformer_ms_per_step"] == m.timings_ms["transformer"] / m.steps
    assert rows[LONG]["speedup_vs_0"] == pytest.approx(t0 / te)
    per_step = (m0.timings_ms["transformer"] / 28) / (me.timings_ms["transformer"] / 14)
    assert rows[LONG]["speedup_per_step_vs_0"] == pytest.approx(per_step)
    assert per_step == pytest.approx(rows[LONG]["speedup_vs_0"] / 2, rel=0.05)  # half the steps: about half of it

    markdown = report_markdown(rep)
    line0 = next(line for line in markdown.splitlines() if line.startswith("| 0 |"))
    line_e = next(line for line in markdown.splitlines() if line.startswith(f"| {LONG} |"))
    assert f"| {t0:.0f} (" in line0 and f"| {te:.0f} (" in line_e
    assert f"{t0 / te:.2f}x, {per_step:.2f}x" in line_e

    text = stdout_table(rep, 200, monkeypatch)
    assert re.search(rf"^0\s+28\s+{t0:.0f}\s", text, re.M), text
    assert re.search(rf"^{LONG}\s+14\s+{te:.0f}\s+\S+\s+{t0 / te:.2f}\s+{per_step:.2f}\s", text, re.M), text

    write_report(rep, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["contenders"] == json.loads(json.dumps(data["contenders"]))
    layout = chart_layout([(c["contender"], c["components_ms"], c["steps"]) for c in data["contenders"]
                           if c["components_ms"]], _font())  # fmt: skip
    assert [t for t, _, _ in layout.panels[0].totals] == [f"{t0:,.0f}", f"{te:,.0f}"]
    assert layout.labels[0][0][-1] == "28 steps" and layout.labels[1][0][-1] == "14 steps"


def test_names_are_never_cut_at_80_columns(monkeypatch):
    rep = report()
    text = stdout_table(rep, 80, monkeypatch)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), text
    assert "…" not in text, text
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"})
    body = [line for line in lines[rule + 1 :] if not line.startswith("failed:")]
    first_column = "".join(re.split(r"\s{2,}", line.strip())[0] for line in body if line.strip())
    for c in rep.contenders:
        assert c.name in first_column, (c.name, text)
    assert "failed: 4:compile=off:attention=sdpa,quant=fp8: boom" in text
