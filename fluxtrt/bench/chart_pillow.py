"""report.png drawn with Pillow, where matplotlib is not installed (CI, most installs).

``chart_layout`` places everything (columns, bars, segments, labels, panels) on whole pixels and ``draw_chart`` only
paints what it placed, so the tests check the geometry: each name centred under its own bar, no two names
overlapping, and each bar exactly as tall as its value on the axis (within the pixel it is rounded to). A segment
under half a pixel on its panel's scale is not inflated: it is marked by a short line of its colour beside the bar,
at its place in the stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxtrt.bench.chart_parts import (
    COLORS,
    MAIN_PANEL_PX,
    Bars,
    as_bars,
    label_lines,
    nice_ticks,
    tick_text,
    total,
    zoom_split,
)

FONT_PX = 13
ZOOM_PANEL_PX = 150
# The width of a sub-pixel segment's mark beside its bar (a gap included), px.
MARK_PX = 5
MIN_COLUMN, MAX_COLUMN, BAR_FRACTION = 64, 108, 0.62
LEGEND_PX, PAD = 150, 14

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (y grows downwards)


@dataclass
class Panel:
    """One plotting area: which components it stacks, its box and its y ticks (ms)."""

    components: tuple[str, ...]
    box: Box
    ticks: list[float]
    caption: str
    segments: list[tuple[int, str, Box]] = field(default_factory=list)  # (bar index, component, box)
    marks: list[tuple[int, str, Box]] = field(default_factory=list)  # segments under a pixel: a line beside the bar
    totals: list[tuple[str, float, float]] = field(default_factory=list)  # (text, x centre, y of the bar's top)

    def y(self, ms: float) -> float:
        x0, y0, x1, y1 = self.box
        return y1 - ms / self.ticks[-1] * (y1 - y0)

    def row(self, ms: float) -> int:
        """The pixel boundary nearest to ``ms``: a bar from the axis to ``row(v)`` fills the rows in between."""
        return round(self.y(ms))


@dataclass
class ChartLayout:
    """Where everything goes; sizes in pixels."""

    size: tuple[int, int]
    panels: list[Panel]
    bars: list[Box]  # the column of each bar in the lowest panel, x0..x1 of the bar
    labels: list[tuple[list[str], Box]]  # per bar: its lines and their box
    line_px: float


def _font(size: int = FONT_PX) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else len(text) * 6.0


def chart_layout(bars: Bars, font: Any, min_width: float = 0) -> ChartLayout:
    """Place the panels, bars, segments, totals and names of a chart of ``bars``, on a page at least ``min_width``
    wide (the title's)."""
    line_px = sum(font.getmetrics()) + 2 if hasattr(font, "getmetrics") else 13

    def measure(text: str) -> float:
        return _text_width(font, text)

    # As wide as the widest name, within limits; a name wider than that wraps.
    bars = as_bars(bars)
    column = round(min(max(max((measure(b.name) for b in bars), default=0.0) + 12, MIN_COLUMN), MAX_COLUMN))
    labels_text = [label_lines(b, column - 6, measure) for b in bars]
    ticks_width = max(measure(tick_text(t)) for ms in [b.ms for b in bars] or [{}] for t in nice_ticks(total(ms)))
    left = round(max(ticks_width, measure("ms per edit") / 2) + 2 * PAD)
    dominant = zoom_split(bars)
    groups = [tuple(COLORS)] + ([tuple(c for c in COLORS if c != dominant)] if dominant else [])
    heights = [MAIN_PANEL_PX, ZOOM_PANEL_PX]
    width = int(max(left + max(len(bars), 1) * column + PAD + LEGEND_PX, min_width))
    top = round(2.4 * line_px + PAD)  # title, then the panel's caption
    panels = []
    for components, height in zip(groups, heights, strict=False):
        peak = max((total(b.ms, components) for b in bars), default=0.0)
        caption = "ms per edit" if len(components) == len(COLORS) else f"ms per edit, all but {dominant}"
        y0 = top + round(line_px)
        box = (left, y0, left + max(len(bars), 1) * column, y0 + height)
        panels.append(Panel(components, box, nice_ticks(peak), caption))
        top = box[3] + round(2 * line_px)
    bar_boxes, labels = [], []
    base = panels[-1].box[3]
    for i, bar in enumerate(bars):
        centre = left + (i + 0.5) * column
        half = round(column * BAR_FRACTION / 2)
        x0, x1 = round(centre) - half, round(centre) + half
        for panel in panels:
            # Each segment spans the rows between the pixel boundaries of its running sum: the bar's top is its
            # total's on the axis, however many segments are rounded on the way.
            done = 0.0
            for comp in panel.components:
                value = bar.ms.get(comp, 0.0)
                if value <= 0:
                    continue
                lower, upper = panel.row(done), panel.row(done + value)
                if upper < lower:
                    panel.segments.append((i, comp, (x0, upper, x1, lower)))
                else:
                    # The row just above its place in the stack; more of them on one row, side by side.
                    mark = lower - 1
                    k = sum(1 for j, _, b in panel.marks if j == i and b[1] == mark)
                    panel.marks.append((i, comp, (x1 + 2 + k * MARK_PX, mark, x1 + (k + 1) * MARK_PX, mark)))
                done += value
            panel.totals.append((tick_text(done), centre, panel.row(done)))
        bar_boxes.append((x0, base - 1, x1, base))
        lines = labels_text[i]
        label_w = max(measure(s) for s in lines)
        box = (centre - label_w / 2, base + 6, centre + label_w / 2, base + 6 + len(lines) * line_px)
        labels.append((lines, box))
    bottom = max((b[3] for _, b in labels), default=base) + PAD
    return ChartLayout((width, int(bottom)), panels, bar_boxes, labels, line_px)


def draw_chart(bars: Bars, path: Path, title: str) -> ChartLayout:
    """Paint the chart of ``bars`` to the PNG ``path``; returns its layout."""
    from PIL import Image, ImageDraw

    bars = as_bars(bars)
    font, title_font = _font(), _font(FONT_PX + 3)
    layout = chart_layout(bars, font, min_width=_text_width(title_font, title) + 2 * PAD)
    img = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((PAD, PAD / 2), title, fill="black", font=title_font)
    for panel in layout.panels:
        _draw_panel(draw, panel, font, layout.line_px)
    for lines, (x0, y0, x1, _) in layout.labels:
        for j, line in enumerate(lines):
            x = (x0 + x1) / 2 - _text_width(font, line) / 2
            draw.text((x, y0 + j * layout.line_px), line, fill="black", font=font)
    if not bars:
        x0, y0, _, y1 = layout.panels[0].box
        draw.text((x0 + PAD, (y0 + y1) / 2), "no contender finished a run", fill="black", font=font)
    _draw_legend(draw, layout, font)
    img.save(path, format="PNG")
    return layout


def _draw_panel(draw: Any, panel: Panel, font: Any, line_px: float) -> None:
    x0, y0, x1, y1 = panel.box
    for tick in panel.ticks:
        y = panel.y(tick)
        draw.line((x0, y, x1, y), fill="#e4e4e4")
        text = tick_text(tick)
        draw.text((x0 - 6 - _text_width(font, text), y - line_px / 2), text, fill="#333333", font=font)
    draw.text((x0 - PAD, y0 - 1.6 * line_px), panel.caption, fill="black", font=font)
    for _, comp, (bx0, by0, bx1, by1) in panel.segments:
        # Rows by0 .. by1 - 1: Pillow fills both end rows, and row by1 belongs to the segment below (or the axis).
        draw.rectangle((bx0, by0, bx1, by1 - 1), fill=COLORS[comp])
    for _, comp, (mx0, my, mx1, _) in panel.marks:
        draw.line((mx0, my, mx1, my), fill=COLORS[comp])
    for text, centre, top in panel.totals:
        draw.text((centre - _text_width(font, text) / 2, top - line_px), text, fill="black", font=font)
    draw.line((x0, y0, x0, y1), fill="black")
    draw.line((x0, y1, x1, y1), fill="black")


def _draw_legend(draw: Any, layout: ChartLayout, font: Any) -> None:
    """The components from the top of a bar down, as they are stacked."""
    x = layout.panels[0].box[2] + PAD
    y = layout.panels[0].box[1]
    for j, comp in enumerate(reversed(COLORS)):
        ly = y + j * (layout.line_px + 4)
        draw.rectangle((x, ly + 2, x + 12, ly + 14), fill=COLORS[comp])
        draw.text((x + 18, ly), comp, fill="black", font=font)
