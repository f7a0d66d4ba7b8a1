"""report.png: one stacked bar per contender, a segment per component (ms of the contender's median run), its
height exactly its value on the axis.

The transformer takes 95-99% of a full-size edit, so at one scale CLIP, T5 and the VAE are a pixel or less. Where a
component would be under ``ZOOM_BELOW_PX`` tall, a second panel below the first shows every component but the
dominant one on a scale of its own, in the same columns. Each bar's name is written under its own column, wrapped at
``:`` first, then at ``,``, ``=``, ``-``, ``_`` or ``/``, to the column's width (engines are named
``engines:<directory>``), and under it the run's step count.

matplotlib draws it where it is installed (``pip install 'fluxtrt[plot]'``); otherwise Pillow, which fluxtrt already
needs, draws the same chart (``fluxtrt.bench.chart_pillow``), so a report is never without its picture.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fluxtrt.bench.chart_parts import COLORS, Bars, as_bars, label_lines, tick_text, zoom_split


def write_chart(bars: Iterable[tuple], path: Path, title: str, renderer: str | None = None) -> str:
    """Draw ``bars`` ((name, {component: ms}, steps) or ``Bar``s) to the PNG ``path``; returns the renderer used
    (matplotlib/pillow).

    ``renderer`` ``"pillow"`` draws with Pillow even where matplotlib is installed; None takes matplotlib where it
    is.
    """
    bars = as_bars(bars)
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
            values = [ms.get(comp, 0.0) for _, ms, *_ in bars]
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
    # Names wrapped to their column, centred under their own bar, and their step counts.
    ax = axes[-1, 0]
    ax.set_xticks(xs)
    ax.set_xticklabels(["\n".join(label_lines(b, 13, len)) for b in bars], fontsize=8, ha="center")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
