"""Build profiles (per input: min, opt and max shapes) checked against a component spec, and the symbol ranges they
imply: what every engine builder compiles for and every engine runner refuses to go beyond."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fluxtrt.errors import BuildError
from fluxtrt.specs.component import ComponentSpec


def check_profile(spec: ComponentSpec, profile: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The profile as tuples, after checking it covers every input with three ordered shapes of the spec's rank.

    Args:
        spec: the component spec.
        profile: per input name, the (min, opt, max) shapes (tuples or the manifest's lists).

    Raises:
        BuildError: a missing input, a wrong rank, a fixed size that differs from the spec, or min > opt > max.
    """
    out = {}
    for t in spec.inputs:
        if t.name not in profile:
            raise BuildError(f"{spec.name}: the profile has no shapes for input {t.name} (it has {sorted(profile)})")
        shapes = tuple(tuple(int(d) for d in s) for s in profile[t.name])
        if len(shapes) != 3 or any(len(s) != len(t.shape) for s in shapes):
            raise BuildError(f"{spec.name}.{t.name}: profile {shapes} is not three shapes of rank {len(t.shape)}")
        for axis, sym in enumerate(t.shape):
            lo, opt, hi = (s[axis] for s in shapes)
            if isinstance(sym, int) and (lo, opt, hi) != (sym, sym, sym):
                raise BuildError(f"{spec.name}.{t.name}: profile axis {axis} is {(lo, opt, hi)}, the spec fixes {sym}")
            if not lo <= opt <= hi:
                raise BuildError(f"{spec.name}.{t.name}: profile {sym} is min {lo}, opt {opt}, max {hi}, not ordered")
        out[t.name] = shapes
    return out


def symbol_ranges(spec: ComponentSpec, profile: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every spec symbol, read off the profile's shapes (checked with ``check_profile``).

    Returns:
        symbol -> (min, opt, max), e.g. ``{"B": (1, 1, 2), "S": (8, 32, 128)}``.

    Raises:
        BuildError: what ``check_profile`` raises, or one symbol with two ranges.
    """
    shapes = check_profile(spec, profile)
    ranges: dict[str, tuple[int, int, int]] = {}
    where: dict[str, str] = {}
    for t in spec.inputs:
        for axis, sym in enumerate(t.shape):
            if isinstance(sym, int):
                continue
            span = tuple(s[axis] for s in shapes[t.name])
            if sym in ranges and ranges[sym] != span:
                raise BuildError(
                    f"{spec.name}: profile gives {sym} the range {ranges[sym]} on {where[sym]} but {span} on "
                    f"{t.name}: the inputs must agree"
                )
            ranges[sym], where[sym] = span, t.name  # type: ignore[assignment]
    return ranges


def runner_ranges(spec: ComponentSpec, profile: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """symbol -> (min, max) of a built profile: the ``ranges`` an engine's runner enforces."""
    return {sym: (lo, hi) for sym, (lo, _, hi) in symbol_ranges(spec, profile).items()}
