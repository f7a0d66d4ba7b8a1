"""benchmarks/headline.py: the README's headline table in one command, run twice on the tiny model as on a GPU (the
first run builds and stops short of the comparison, the second finds the engines up to date and compares); its
table's figures are report.json's."""

import json
import re

import pytest
from PIL import Image

from benchmarks.headline import main

pytestmark = pytest.mark.slow


def engine_files(directory):
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("*.onnx")}


def table(markdown: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the Markdown table whose header starts with ``first_header``, as {header: cell}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    headers = [h.strip() for h in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


@pytest.fixture(scope="module")
def headline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("headline")
    engines, out = tmp / "engines", tmp / "results"
    argv = ["--model", "tiny", "--device", "cpu", "--backend", "onnxruntime", "--precision", "fp32",
            "--resolution", "256x256", "--stages", "0:steps=2,4:compile=off:steps=2", "--runs", "1", "--warmup", "0",
            "--engines", str(engines), "--out", str(out), "--compare-s", "1e9"]  # fmt: skip
    first = main(argv)
    built = engine_files(engines)
    after_first = sorted(p.name for p in out.iterdir()) if out.exists() else []
    second = main(argv)
    return {"argv": argv, "codes": (first, second), "built": built, "after_first": after_first,
            "engines": engines, "out": out}  # fmt: skip


def test_the_first_run_builds_and_the_second_compares_without_building(headline):
    assert headline["codes"] == (0, 0)
    assert len(headline["built"]) == 5  # clip, t5, vae_encoder, transformer, vae_decoder
    assert headline["after_first"] == []  # the comparison did not fit the budget left after building
    assert engine_files(headline["engines"]) == headline["built"]  # the second run rebuilt nothing
    names = {"headline.md", "report.md", "report.json", "report.png", "command.txt"}
    assert names <= {p.name for p in headline["out"].iterdir()}
    with Image.open(headline["out"] / "report.png") as chart:
        chart.verify()


def test_command_txt_names_the_card_and_the_exact_command(headline):
    lines = (headline["out"] / "command.txt").read_text().splitlines()
    assert lines[0].startswith("# CPU (")
    assert lines[1] == "python -m benchmarks.headline " + " ".join(headline["argv"])
    assert any(line.startswith("python -m fluxtrt build ") and "--jobs auto" in line for line in lines)
    assert any(line.startswith("python -m fluxtrt compare ") for line in lines)
    assert lines[-1].startswith("# build: up to date")


def test_the_tables_figures_are_the_json_s(headline):
    report = json.loads((headline["out"] / "report.json").read_text())
    contenders = report["contenders"]
    assert [c["contender"] for c in contenders] == ["0:steps=2", "4:compile=off:steps=2", "engines:engines"]
    assert all(c["status"] == "ok" for c in contenders)
    stage0, last = contenders[0]["median_total_ms"], contenders[1]["median_total_ms"]

    text = (headline["out"] / "headline.md").read_text()
    assert text.startswith("CPU (")
    rows = table(text, "row")
    assert [r["row"] for r in rows] == [c["contender"] for c in contenders]
    for row, c in zip(rows, contenders, strict=True):
        assert row["steps"] == str(c["steps"])
        assert row["edit ms"] == f"{c['median_total_ms']:.0f}"
        assert row["transformer ms per step"] == f"{c['transformer_ms_per_step']:.1f}"
        assert row["vs stage 0"] == f"{stage0 / c['median_total_ms']:.2f}x"
        assert row["vs 4:compile=off:steps=2"] == f"{last / c['median_total_ms']:.2f}x"

    report_rows = table((headline["out"] / "report.md").read_text(), "stage")
    assert [r["stage"] for r in report_rows] == [c["contender"] for c in contenders]
    total = next(h for h in report_rows[0] if h.startswith("total"))
    for row, c in zip(report_rows, contenders, strict=True):
        assert float(re.match(r"[\d.]+", row[total]).group()) == pytest.approx(c["median_total_ms"], abs=0.5)
