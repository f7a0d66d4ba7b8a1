"""What both renderers of report.png share: the bars, the component colours, the scale, the ticks, when to zoom,
and how a name wraps under its column."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

COLORS = {
    "clip": "#8c564b",
    "t5": "#e377c2",
    "vae_encoder": "#2ca02c",
    "transformer": "#1f77b4",
    "vae_decoder": "#ff7f0e",
    "glue": "#7f7f7f",
}
# A component drawn shorter than this (main panel height in px, or matplotlib's equivalent) calls for the zoom panel.
ZOOM_BELOW_PX = 4.0
MAIN_PANEL_PX = 300


class Bar(NamedTuple):
    """One contender's bar: its name, {component: ms} of its median run, and that run's denoising steps."""

    name: str
    ms: dict[str, float]
    steps: int | None = None


Bars = list[Bar]


def as_bars(bars: Iterable[tuple]) -> Bars:
    """``(name, ms)`` or ``(name, ms, steps)`` tuples as ``Bar``s."""
    return [Bar(*b) for b in bars]


def total(ms: dict[str, float], components: tuple[str, ...] | None = None) -> float:
    return sum(ms.get(c, 0.0) for c in (components or tuple(COLORS)))


def zoom_split(bars: Bars, panel_px: float = MAIN_PANEL_PX) -> str | None:
    """The dominant component (largest summed over the bars) when some other component would be drawn under
    ``ZOOM_BELOW_PX`` on one scale for all, so the rest needs a panel of its own; else None."""
    peak = max((total(ms) for _, ms, *_ in bars), default=0.0)
    if peak <= 0:
        return None
    smallest = min((v for _, ms, *_ in bars for c, v in ms.items() if c in COLORS and v > 0), default=peak)
    if smallest / peak * panel_px >= ZOOM_BELOW_PX:
        return None
    return max(COLORS, key=lambda c: sum(ms.get(c, 0.0) for _, ms, *_ in bars))


def nice_ticks(peak: float, count: int = 5) -> list[float]:
    """Ticks 0, s, 2s, ... up to the first at or above ``peak``, with s of the form 1, 2, 2.5 or 5 x 10^k."""
    if peak <= 0:
        return [0.0, 1.0]
    raw = peak / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    top = math.ceil(peak / step - 1e-9)
    return [i * step for i in range(top + 1)]


def tick_text(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == 0 else f"{value:.3g}"


def wrap_label(name: str, max_width: float, measure: Callable[[str], float]) -> list[str]:
    """``name`` in lines no wider than ``max_width`` (as ``measure`` says): broken after ``:`` first (a stage's
    overrides, ``engines:`` and its directory), then inside a part too wide alone after ``,=-_/`` or a space, and
    only then between characters."""
    lines: list[str] = []
    for part in [p for p in re.split(r"(?<=:)", name) if p]:
        if lines and measure(lines[-1] + part) <= max_width:
            lines[-1] += part
            continue
        line = ""
        for piece in [p for p in re.split(r"(?<=[,=\-_/ ])", part) if p]:
            if line and measure(line + piece) > max_width:
                lines.append(line)
                line = ""
            line += piece
            while measure(line) > max_width and len(line) > 1:  # a piece wider than the column: cut it
                cut = max([i for i in range(1, len(line)) if measure(line[:i]) <= max_width] or [1])
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return [s.rstrip() for s in lines if s.strip()] or [name]


def label_lines(bar: Bar, max_width: float, measure: Callable[[str], float]) -> list[str]:
    """What is written under ``bar``: its name wrapped to ``max_width``, then its step count on a line of its own
    (contenders may run different step counts, which their per-edit times include)."""
    steps = [] if bar.steps is None else [f"{bar.steps} step" + ("" if bar.steps == 1 else "s")]
    return wrap_label(bar.name, max_width, measure) + steps
