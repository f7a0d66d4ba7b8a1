"""LoRA on engines: the merged weights ``W + sum(scale * alpha / rank * B A)`` of the linears the LoRAs target,
computed in FP32 from the engine's own weights and handed to its runner, which keeps the originals for removal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fluxtrt.errors import InputError
from fluxtrt.lora.files import Lora, check_fits, merged_deltas


def engine_runner(runner: Any) -> Any:
    """The runner that holds the transformer's weights (``runner`` itself, or the one a delegating runner wraps)."""
    while not hasattr(runner, "set_linear_weights") and hasattr(runner, "inner"):
        runner = runner.inner
    return runner


def apply_to_runner(runner: Any, loras: Sequence[Lora], where: str = "engine's") -> dict[str, Any]:
    """Merge ``loras`` (each at its spec's scale) into the transformer ``runner``'s weights; none: the originals,
    bit for bit. Returns the merged weights handed over (module -> tensor).

    Raises:
        InputError: a runner whose weights cannot be replaced (say which backend build can), or a LoRA that does
            not fit the transformer; the runner is then unchanged.
    """
    target = engine_runner(runner)
    if not hasattr(target, "set_linear_weights"):
        raise InputError(
            f"--lora: the {type(target).__name__} transformer engine cannot take new weights: use engines built "
            "with --backend onnxruntime, or aotinductor with --aoti-weights external"
        )
    if not loras:
        target.set_linear_weights(None)
        return {}
    base = target.linear_weights()
    shapes = {m: tuple(w.shape) for m, w in base.items()}
    for lora in loras:
        check_fits(lora, shapes, where)
    merged = {}
    for module, delta in merged_deltas(loras).items():
        weight = base[module]
        merged[module] = (weight.float() + delta.to(weight.device)).to(weight.dtype)
    target.set_linear_weights(merged)
    return merged
