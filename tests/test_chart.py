"""report.png: each bar named under itself with its step count, each bar as tall as its label on the axis (measured
on the drawn pixels), tiny segments marked rather than inflated, the same bars from report.json, and the layout
helpers (ticks, label wrapping, when to zoom)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from fluxtrt.bench.chart_parts import COLORS, nice_ticks, wrap_label, zoom_split
from fluxtrt.bench.chart_pillow import chart_layout, draw_chart

ROOT = Path(__file__).resolve().parents[1]
H100 = ROOT / "benchmarks" / "results" / "compare_h100" / "report.json"


def h100_bars() -> list[tuple[str, dict[str, float], int]]:
    """The committed H100 comparison (the transformer is 95-99% of every bar), plus an engines row with a long
    directory name."""
    data = json.loads(H100.read_text())
    bars = [(c["contender"], c["components_ms"], c["steps"]) for c in data["contenders"]]
    return [*bars, ("engines:aoti-fp8-h100-external-weights", dict(bars[-1][1]), 14)]


def check_layout(bars, layout) -> None:
    columns = []
    for i, (lines, (x0, y0, x1, y1)) in enumerate(layout.labels):
        assert y1 <= layout.size[1]
        bx0, _, bx1, _ = layout.bars[i]
        assert (x0 + x1) / 2 == pytest.approx((bx0 + bx1) / 2, abs=0.5), f"label {i} is not under its bar"
        assert y0 > layout.panels[-1].box[3], "labels go under the lowest panel"
        name, steps = bars[i][0], bars[i][2] if len(bars[i]) > 2 else None
        if steps is not None:
            assert lines[-1] == f"{steps} steps", lines
            lines = lines[:-1]
        assert "".join(lines).replace(" ", "") == name.replace(" ", ""), lines
        columns.append((x0, x1))
    assert all(a[1] < b[0] for a, b in zip(columns, columns[1:], strict=False)), "labels overlap"
    # Every non-zero component is drawn, as a segment or a mark beside the bar, in each panel that stacks it.
    for panel in layout.panels:
        for i, (_, ms, *_) in enumerate(bars):
            for comp in panel.components:
                drawn = [b for j, c, b in panel.segments + panel.marks if (j, c) == (i, comp)]
                assert len(drawn) == (ms.get(comp, 0) > 0), (i, comp, drawn)


def rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[k : k + 2], 16) for k in (1, 3, 5))


def measured_bars(png: Path, layout) -> list[list[tuple[float, float]]]:
    """Per panel, per bar: (its height in ms as the drawn pixels say, the ms its label says).

    The scale comes from the picture: rows from the axis (black) to the top grid line (light grey) at the left edge
    of the panel, which is the top tick's value. A bar's height is its run of component colours up from the axis at
    its centre column."""
    colors = {rgb(c) for c in COLORS.values()}
    with Image.open(png) as img:
        pixels = img.convert("RGB").load()
    result = []
    for panel in layout.panels:
        x0, y0, x1, y1 = panel.box
        column = [pixels[x0 + 2, y] for y in range(int(y0) - 2, int(y1) + 3)]
        rows = [y for y, p in zip(range(int(y0) - 2, int(y1) + 3), column, strict=True)]
        axis = next(y for y, p in zip(rows, column, strict=True) if p == (0, 0, 0))
        grid = min(y for y, p in zip(rows, column, strict=True) if p == rgb("#e4e4e4"))
        ms_per_px = panel.ticks[-1] / (axis - grid)
        bars = []
        for (text, _, _), (bx0, _, bx1, _) in zip(panel.totals, layout.bars, strict=True):
            height = 0
            while pixels[round((bx0 + bx1) / 2), axis - 1 - height] in colors:
                height += 1
            bars.append((height * ms_per_px, float(text.replace(",", ""))))
        result.append(bars)
    return result


def assert_bars_match_labels(png: Path, layout) -> None:
    for panel, bars in zip(layout.panels, measured_bars(png, layout), strict=True):
        ms_per_px = panel.ticks[-1] / (panel.box[3] - panel.box[1])
        for i, (height_ms, label_ms) in enumerate(bars):
            # within a pixel, plus the rounding of the label's text (whole ms from 10 ms up)
            assert abs(height_ms - label_ms) <= ms_per_px + 0.5, (panel.caption, i, height_ms, label_ms)


def test_full_size_chart_zooms_in_on_the_small_components(tmp_path):
    from PIL import ImageFont

    bars = h100_bars()
    assert zoom_split(bars) == "transformer"
    layout = draw_chart(bars, tmp_path / "c.png", "title")
    assert len(layout.panels) == 2 and "transformer" not in layout.panels[1].components
    check_layout(bars, layout)
    assert_bars_match_labels(tmp_path / "c.png", layout)
    assert layout.labels[-1][0] == ["engines:", "aoti-fp8-h100-", "external-weights", "14 steps"]
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
    assert_bars_match_labels(tmp_path / "c.png", layout)
    assert layout.size[0] > 400  # as wide as its title
    empty = draw_chart([], tmp_path / "e.png", "nothing finished")
    assert empty.labels == [] and (tmp_path / "e.png").stat().st_size > 0


def test_bars_are_as_tall_as_their_labels_and_tiny_segments_are_not_inflated(tmp_path):
    """Six segments each rounded on the way still end at the total's pixel; a 0.4 ms CLIP next to seconds of the rest
    stays under a pixel in both panels (marked beside the bar), instead of being drawn at a visible height."""
    ms = {"clip": 0.4, "t5": 13.7, "vae_encoder": 101.3, "transformer": 2411.9, "vae_decoder": 147.4, "glue": 2.7}
    bars = [("0", ms, 28), ("engines:e", {k: v / 3 for k, v in ms.items()}, 14), ("2", {"transformer": 2678.0}, 28)]
    layout = draw_chart(bars, tmp_path / "c.png", "title")
    assert len(layout.panels) == 2
    check_layout(bars, layout)
    assert_bars_match_labels(tmp_path / "c.png", layout)
    with Image.open(tmp_path / "c.png") as img:
        pixels = img.convert("RGB").load()
    clip = rgb(COLORS["clip"])
    for panel in layout.panels:
        for i in range(2):
            bx0, _, bx1, _ = layout.bars[i]
            inside = sum(pixels[x, y] == clip for x in range(bx0, bx1 + 1) for y in range(panel.box[1], panel.box[3]))
            assert inside == 0, (panel.caption, i)  # 0.4 ms (or 0.13) is under a pixel on either scale
            beside = sum(
                pixels[x, y] == clip for x in range(bx1 + 1, bx1 + 20) for y in range(panel.box[1], panel.box[3])
            )
            assert 1 <= beside <= 8, (panel.caption, i, beside)  # its mark


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
