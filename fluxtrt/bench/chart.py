"""report.png: one stacked bar per contender, a segment per component (ms of the contender's median-total run).

matplotlib draws it where it is installed (``pip install 'fluxtrt[plot]'``); otherwise Pillow, which fluxtrt already
needs, draws the same chart more plainly, so a report is never without its picture.
"""

from __future__ import annotations

from pathlib import Path

COLORS = {
    "clip": "#8c564b",
    "t5": "#e377c2",
    "vae_encoder": "#2ca02c",
    "transformer": "#1f77b4",
    "vae_decoder": "#ff7f0e",
    "glue": "#7f7f7f",
}


def write_chart(bars: list[tuple[str, dict[str, float]]], path: Path, title: str) -> str:
    """Draw ``bars`` (name, {component: ms}) to the PNG ``path``; returns the renderer used (matplotlib/pillow)."""
    try:
        import matplotlib
    except ImportError:
        _pillow_chart(bars, path, title)
        return "pillow"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(bars) + 2), 5), dpi=110)
    names = [name for name, _ in bars]
    bottoms = [0.0] * len(bars)
    for comp, color in COLORS.items():
        values = [ms.get(comp, 0.0) for _, ms in bars]
        ax.bar(names, values, bottom=bottoms, color=color, label=comp)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for i, total in enumerate(bottoms):
        ax.text(i, total, f"{total:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per edit")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return "matplotlib"


def _pillow_chart(bars: list[tuple[str, dict[str, float]]], path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    bar_w, gap, left, top, bottom, height = 56, 44, 70, 40, 110, 360
    width = left + max(len(bars), 1) * (bar_w + gap) + 150
    img = Image.new("RGB", (width, top + height + bottom), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")
    totals = [sum(ms.get(c, 0.0) for c in COLORS) for _, ms in bars]
    peak = max(totals, default=0.0) or 1.0
    base_y = top + height
    draw.line((left, top, left, base_y), fill="black")
    draw.line((left, base_y, width - 150, base_y), fill="black")
    for frac in (0.0, 0.5, 1.0):
        y = base_y - frac * height
        draw.text((5, y - 6), f"{peak * frac:.0f} ms", fill="black")
    for i, (name, ms) in enumerate(bars):
        x = left + gap // 2 + i * (bar_w + gap)
        y = base_y
        for comp, color in COLORS.items():
            h = ms.get(comp, 0.0) / peak * height
            if h > 0:
                draw.rectangle((x, y - h, x + bar_w, y), fill=color)
            y -= h
        draw.text((x, y - 14), f"{totals[i]:.0f}", fill="black")
        draw.text((x - gap // 2, base_y + 6 + (i % 3) * 14), name[:24], fill="black")
    for j, (comp, color) in enumerate(COLORS.items()):
        ly = top + j * 18
        draw.rectangle((width - 140, ly, width - 128, ly + 12), fill=color)
        draw.text((width - 122, ly), comp, fill="black")
    img.save(path, format="PNG")
