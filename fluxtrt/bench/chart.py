"""report.png: one stacked bar per contender, a segment per component (ms of the contender's median-total run).

The transformer takes 95-99% of a full-size edit, so at one scale CLIP, T5 and the VAE are a pixel or less. Where a
component would be under ``ZOOM_BELOW_PX`` tall, a second panel below the first shows every component but the
dominant one on a scale of its own, in the same columns. Each bar's name is written under its own column, wrapped at
``:`` first, then at ``,``, ``=``, ``-``, ``_`` or ``/``, to the column's width (engines are named
``engines:<directory>``).

matplotlib draws it where it is installed (``pip install 'fluxtrt[plot]'``); otherwise Pillow, which fluxtrt already
needs, draws the same chart (``fluxtrt.bench.chart_pillow``), so a report is never without its picture.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

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

Bars = list[tuple[str, dict[str, float]]]


def write_chart(bars: Bars, path: Path, title: str, renderer: str | None = None) -> str:
    """Draw ``bars`` (name, {component: ms}) to the PNG ``path``; returns the renderer used (matplotlib/pillow).

    ``renderer`` ``"pillow"`` draws with Pillow even where matplotlib is installed; None takes matplotlib where it
    is.
    """
    try:
        if renderer == "pillow":
            raise ImportError
        import matplotlib
    except ImportError:
        from fluxtrt.bench.chart_pillow import draw_chart

        draw_chart(bars, path, title)
        return "pillow"
    matplotlib.use("Agg")
    _matplotlib_chart(bars, path, title)
    return "matplotlib"


def total(ms: dict[str, float], components: tuple[str, ...] | None = None) -> float:
    return sum(ms.get(c, 0.0) for c in (components or tuple(COLORS)))


def zoom_split(bars: Bars, panel_px: float = MAIN_PANEL_PX) -> str | None:
    """The dominant component (largest summed over the bars) when some other component would be drawn under
    ``ZOOM_BELOW_PX`` on one scale for all, so the rest needs a panel of its own; else None."""
    peak = max((total(ms) for _, ms in bars), default=0.0)
    if peak <= 0:
        return None
    smallest = min((v for _, ms in bars for c, v in ms.items() if c in COLORS and v > 0), default=peak)
    if smallest / peak * panel_px >= ZOOM_BELOW_PX:
        return None
    return max(COLORS, key=lambda c: sum(ms.get(c, 0.0) for _, ms in bars))


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


def _matplotlib_chart(bars: Bars, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    dominant = zoom_split(bars)
    panels = [tuple(COLORS)] + ([tuple(c for c in COLORS if c != dominant)] if dominant else [])
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False, height_ratios=[3, 1.3][: len(panels)],
                             figsize=(max(6.0, 0.9 * len(bars) + 2.5), 5.5 if dominant else 4.5), dpi=110)  # fmt: skip
    xs = list(range(len(bars)))
    for ax, components in zip(axes[:, 0], panels, strict=True):
        bottoms = [0.0] * len(bars)
        for comp in components:
            values = [ms.get(comp, 0.0) for _, ms in bars]
            ax.bar(xs, values, bottom=bottoms, color=COLORS[comp], label=comp, width=0.6)
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
        for x, height in zip(xs, bottoms, strict=True):
            ax.text(x, height, tick_text(height), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(bottoms, default=1.0) * 1.15 or 1.0)
        ax.grid(axis="y", color="#dddddd")
        ax.set_axisbelow(True)
    axes[0, 0].set_ylabel("ms per edit")
    axes[0, 0].set_title(title, fontsize=9)
    if dominant:
        axes[1, 0].set_ylabel(f"ms, all but\n{dominant}", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    axes[0, 0].legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    # Names wrapped to their column, centred under their own bar.
    ax = axes[-1, 0]
    ax.set_xticks(xs)
    ax.set_xticklabels(["\n".join(wrap_label(n, 13, len)) for n, _ in bars], fontsize=8, ha="center")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
