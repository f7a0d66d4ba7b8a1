"""report.png: each bar named under itself, every component visible, the same bars from report.json, and the
layout helpers (ticks, label wrapping, when to zoom)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from fluxtrt.bench.chart import COLORS, nice_ticks, wrap_label, zoom_split
from fluxtrt.bench.chart_pillow import MIN_SEGMENT_PX, chart_layout, draw_chart

ROOT = Path(__file__).resolve().parents[1]
H100 = ROOT / "benchmarks" / "results" / "compare_h100" / "report.json"


def h100_bars() -> list[tuple[str, dict[str, float]]]:
    """The committed H100 comparison (the transformer is 95-99% of every bar), plus an engines row with a long
    directory name."""
    data = json.loads(H100.read_text())
    bars = [(c["contender"], c["components_ms"]) for c in data["contenders"]]
    return [*bars, ("engines:aoti-fp8-h100-external-weights", dict(bars[-1][1]))]


def check_layout(bars, layout) -> None:
    columns = []
    for i, (lines, (x0, y0, x1, y1)) in enumerate(layout.labels):
        assert y1 <= layout.size[1]
        bx0, _, bx1, _ = layout.bars[i]
        assert (x0 + x1) / 2 == pytest.approx((bx0 + bx1) / 2, abs=0.5), f"label {i} is not under its bar"
        assert y0 > layout.panels[-1].box[3], "labels go under the lowest panel"
        assert "".join(lines).replace(" ", "") == bars[i][0].replace(" ", ""), lines
        columns.append((x0, x1))
    assert all(a[1] < b[0] for a, b in zip(columns, columns[1:], strict=False)), "labels overlap"
    # Every non-zero component has a segment at least MIN_SEGMENT_PX tall in some panel, in its bar's column.
    for i, (_, ms) in enumerate(bars):
        for comp, value in ms.items():
            if comp in COLORS and value > 0:
                heights = [b[3] - b[1] for p in layout.panels for j, c, b in p.segments if (j, c) == (i, comp)]
                assert heights and max(heights) >= MIN_SEGMENT_PX - 1e-9, (i, comp, heights)


def test_full_size_chart_zooms_in_on_the_small_components(tmp_path):
    from PIL import ImageFont

    bars = h100_bars()
    assert zoom_split(bars) == "transformer"
    layout = draw_chart(bars, tmp_path / "c.png", "title")
    assert len(layout.panels) == 2 and "transformer" not in layout.panels[1].components
    check_layout(bars, layout)
    assert layout.labels[-1][0] == ["engines:", "aoti-fp8-h100-", "external-weights"]
    with Image.open(tmp_path / "c.png") as img:
        assert img.format == "PNG" and img.size == layout.size
    # The same layout whatever font Pillow has (the bitmap one of older versions).
    check_layout(bars, chart_layout(bars, getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()))


def test_comparable_components_need_no_zoom_and_no_bars_still_draw(tmp_path):
    bars = [("0", {c: 100.0 for c in COLORS}), ("engines:tiny-ort", {c: 50.0 for c in COLORS})]
    assert zoom_split(bars) is None
    layout = draw_chart(bars, tmp_path / "c.png", "a title wider than two bars " * 4)
    assert len(layout.panels) == 1
    check_layout(bars, layout)
    assert layout.size[0] > 400  # as wide as its title
    empty = draw_chart([], tmp_path / "e.png", "nothing finished")
    assert empty.labels == [] and (tmp_path / "e.png").stat().st_size > 0


def test_chart_helpers():
    assert nice_ticks(10686) == [0, 2500, 5000, 7500, 10000, 12500]
    assert nice_ticks(203) == [0, 50, 100, 150, 200, 250]
    assert nice_ticks(0.8) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert nice_ticks(0) == [0.0, 1.0]
    chars = len  # one unit per character
    assert wrap_label("4:compile=off:steps=2", 14, chars) == ["4:compile=off:", "steps=2"]
    assert wrap_label("engines:tiny-ort", 12, chars) == ["engines:", "tiny-ort"]
    assert wrap_label("0", 12, chars) == ["0"]
    assert wrap_label("abcdefghijklmnop", 6, chars) == ["abcdef", "ghijkl", "mnop"]


def test_redraw_from_report_json(tmp_path):
    from fluxtrt.bench.report import redraw_chart

    assert redraw_chart(json.loads(H100.read_text()), tmp_path / "r.png", "pillow") == "pillow"
    with Image.open(tmp_path / "r.png") as img:
        assert img.size[0] > 800 and img.size[1] > 400
