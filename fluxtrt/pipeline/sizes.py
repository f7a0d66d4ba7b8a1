"""Fitting an edit into the sizes its engines were built for.

Engines accept each side of the target and of the reference between the build's ``--min-resolution`` and
``--max-resolution``. An edit whose sizes lie outside that range is not refused while some size inside it works:
each image goes to the preferred Kontext size inside the range closest to it in aspect ratio or, where the range
holds none, to the largest size inside the range at its own aspect ratio (for engines of one size: that size).
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxtrt.errors import InputError
from fluxtrt.pipeline.image import (
    PREFERRED_KONTEXT_RESOLUTIONS,
    fit_to_area,
    floored_resolution,
    preferred_resolution,
)
from fluxtrt.specs.flux import FluxDims, Resolution, image_tokens

PREFERRED = [Resolution(w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS]
# The smallest range that holds every preferred size: each side from 672 to 1568.
PREFERRED_LOW = Resolution(min(r.width for r in PREFERRED), min(r.height for r in PREFERRED))
PREFERRED_HIGH = Resolution(max(r.width for r in PREFERRED), max(r.height for r in PREFERRED))


@dataclass(frozen=True)
class SizeRange:
    """The sizes engines take: each side from ``low``'s to ``high``'s (``fluxtrt build``'s min and max resolution)."""

    low: Resolution
    high: Resolution

    def holds(self, res: Resolution) -> bool:
        return res.within(self.low, self.high)

    def sides(self, multiple_of: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(lowest, highest) width and (lowest, highest) height inside the range that are multiples of
        ``multiple_of``; a side with none has lowest > highest."""
        up = lambda v: -(-v // multiple_of) * multiple_of  # noqa: E731
        down = lambda v: v // multiple_of * multiple_of  # noqa: E731
        return (up(self.low.width), down(self.high.width)), (up(self.low.height), down(self.high.height))

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low} to {self.high}"


def excluded_preferred(low: Resolution, high: Resolution) -> str | None:
    """A notice when a build's range ``low``..``high`` leaves out preferred Kontext sizes (saying how many, which,
    and the range that holds them all), else None."""
    excluded = [r for r in PREFERRED if not r.within(low, high)]
    if not excluded:
        return None
    wide_low = Resolution(min(low.width, PREFERRED_LOW.width), min(low.height, PREFERRED_LOW.height))
    wide_high = Resolution(max(high.width, PREFERRED_HIGH.width), max(high.height, PREFERRED_HIGH.height))
    held = [r for r in PREFERRED if r not in excluded]
    if len(excluded) <= len(held):
        names = ", ".join(map(str, excluded))
    else:
        names = f"it holds only {', '.join(map(str, held))}" if held else "it holds none of them"
    return (
        f"--min-resolution {low} --max-resolution {high} excludes {len(excluded)} of the {len(PREFERRED)} preferred "
        f"Kontext sizes ({names}): an image whose preferred size is one of them is edited at a size inside the "
        "range instead; "
        f"--min-resolution {wide_low} --max-resolution {wide_high} includes them all"
    )


def fit_size(wanted: Resolution, sizes: SizeRange, multiple_of: int) -> Resolution:
    """``wanted`` if the range holds it; else the preferred Kontext size inside the range closest to it in aspect
    ratio; else ``wanted`` scaled to the largest size inside the range at its aspect ratio, each side rounded to a
    multiple of ``multiple_of`` and brought into the range (engines of one size: that size).

    Raises:
        InputError: the range holds no side that is a multiple of ``multiple_of``.
    """
    if sizes.holds(wanted):
        return wanted
    (w_lo, w_hi), (h_lo, h_hi) = sides = sizes.sides(multiple_of)
    if w_lo > w_hi or h_lo > h_hi:
        raise InputError(no_size_message(sizes, multiple_of, sides))
    aspect = wanted.width / wanted.height
    inside = [r for r in PREFERRED if sizes.holds(r) and r.width % multiple_of == 0 and r.height % multiple_of == 0]
    if inside:
        return min(inside, key=lambda r: (abs(r.width / r.height - aspect), -r.width * r.height))
    scale = min(w_hi / wanted.width, h_hi / wanted.height)
    side = lambda v, lo, hi: min(max(round(v * scale / multiple_of) * multiple_of, lo), hi)  # noqa: E731
    return Resolution(side(wanted.width, w_lo, w_hi), side(wanted.height, h_lo, h_hi))


def no_size_message(sizes: SizeRange, multiple_of: int, sides: tuple[tuple[int, int], tuple[int, int]]) -> str:
    """Why engines of ``sizes`` take no edit at all, and the build that would."""
    (w_lo, w_hi), (h_lo, h_hi) = sides
    return (
        f"the engines were built for sizes {sizes}, which hold no width and height that are both multiples of "
        f"{multiple_of} (widths {w_lo}..{w_hi}, heights {h_lo}..{h_hi} once rounded inward), so no edit fits them: "
        f"rebuild with --min-resolution and --max-resolution sides that are multiples of {multiple_of}, e.g. "
        f"--min-resolution {PREFERRED_LOW} --max-resolution {PREFERRED_HIGH} (every preferred Kontext size)"
    )


def wanted_geometry(image_size: tuple[int, int], height: int | None, width: int | None, max_area: int,
                    multiple_of: int, auto_resize: bool = True) -> tuple[Resolution, Resolution]:  # fmt: skip
    """(target, reference) of an edit of a reference of ``image_size`` (width, height), before any fit to engines.

    The reference goes to its closest preferred Kontext resolution, or with ``auto_resize=False`` keeps its own
    size floored to ``multiple_of``; the target is the reference's resolution, or the explicit height/width fitted
    to ``max_area``.
    """
    resize = preferred_resolution if auto_resize else floored_resolution
    reference = resize(*image_size, multiple_of)
    if height is None or width is None:
        return reference, reference
    return fit_to_area(width, height, max_area, multiple_of), reference


def fit_geometry(
    target: Resolution,
    reference: Resolution,
    sizes: SizeRange,
    multiple_of: int,
    asked: Resolution | None = None,
    source: str = "the engines",
) -> tuple[Resolution, Resolution, list[str]]:
    """(target, reference) brought into ``sizes`` (``fit_size``), and one notice for each one changed.

    Args:
        target, reference: the sizes the edit would have without engines.
        sizes: what the engines take.
        multiple_of: each side a multiple of this.
        asked: the explicit --width/--height, if any: a target fitted back to exactly it needs no notice.
        source: what the engines are, for the notices.

    Raises:
        InputError: no size fits the engines.
    """
    fitted_target, fitted_reference = fit_size(target, sizes, multiple_of), fit_size(reference, sizes, multiple_of)
    notices = []
    why = f"outside the sizes {source} were built for ({sizes})"
    if fitted_target != target and fitted_target != asked:
        notices.append(f"the target {target} is {why}: the edit is made at {_how(fitted_target, sizes)}")
    if fitted_reference != reference:
        notices.append(
            f"the reference's preferred size {reference} is {why}: the reference is resized to "
            f"{_how(fitted_reference, sizes)}"
        )
    return fitted_target, fitted_reference, notices


def _how(fitted: Resolution, sizes: SizeRange) -> str:
    if sizes.low == sizes.high:
        return f"{fitted}, the one size they take"
    if fitted in PREFERRED:
        return f"{fitted}, the preferred Kontext size inside them closest in aspect ratio"
    return f"{fitted}, the largest size inside them at about its aspect ratio"


def check_sequence(dims: FluxDims, target: Resolution, reference: Resolution, size: int) -> None:
    """Raise InputError, before any work, when the edit's tokens do not split evenly over ``size`` processes.

    The image tokens (target + reference) and the text tokens are each split in equal parts. fluxtrt refuses an
    uneven split rather than padding: padded tokens would take part in attention and change the result.
    """
    check_split(dims.t5_len, dims.multiple_of, target, reference, size)


def check_split(text_tokens: int, multiple_of: int, target: Resolution, reference: Resolution, size: int) -> None:
    """``check_sequence`` from the two numbers it needs: the T5 tokens, and the pixels a side per image token."""
    t, r = image_tokens(target, multiple_of), image_tokens(reference, multiple_of)
    if (t + r) % size == 0 and text_tokens % size == 0:
        return
    fits = [n for n in range(1, size) if (t + r) % n == 0 and text_tokens % n == 0]
    raise InputError(
        f"a {target} edit of a {reference} reference has {t + r} image tokens ({t} target + {r} reference) and "
        f"{text_tokens} text tokens, which do not split evenly over --gpus {size} (fluxtrt does not pad): pick a "
        f"--width/--height whose tokens divide by {size}, e.g. 1024x1024, or use --gpus {max(fits)}"
    )
