"""LoRA on engines: the merged weights ``W + sum(scale * alpha / rank * B A)`` of the linears the LoRAs target,
computed in FP32 from the engine's own weights and handed to its runner, which keeps the originals for removal."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from fluxtrt.errors import InputError
from fluxtrt.lora.files import Lora, LoraLayer, check_fits


def engine_runner(runner: Any) -> Any:
    """The runner that holds the transformer's weights (``runner`` itself, or the one a delegating runner wraps)."""
    while not hasattr(runner, "set_linear_weights") and hasattr(runner, "inner"):
        runner = runner.inner
    return runner


class MergedWeights(Mapping):
    """Module -> its weight in ``base`` plus the summed update of the LoRAs at their scales (those at 0 left out),
    computed when read: in FP32 on the weight's device, returned in its dtype. A runner that reads them one at a
    time holds one merged weight beside its own, not a second transformer."""

    def __init__(self, base: Mapping[str, Any], loras: Sequence[Lora], scales: Sequence[float]):
        self.base = base
        self.layers: dict[str, list[tuple[LoraLayer, float]]] = {}
        for lora, scale in zip(loras, scales, strict=True):
            if scale != 0:
                for module, layer in lora.layers.items():
                    self.layers.setdefault(module, []).append((layer, scale))

    def __getitem__(self, module: str) -> Any:
        weight = self.base[module]
        deltas = [layer.delta(scale, weight.device) for layer, scale in self.layers[module]]
        return (weight.float() + sum(deltas[1:], deltas[0])).to(weight.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def weight_shapes(weights: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Module -> shape of a runner's ``linear_weights()``, without reading them where the mapping knows them (an FP8
    engine's are dequantized when read)."""
    shapes = getattr(weights, "shapes", None)
    return dict(shapes) if shapes is not None else {m: tuple(w.shape) for m, w in weights.items()}


def check_runner(runner: Any, loras: Sequence[Lora], where: str = "engine's") -> tuple[Any, Mapping[str, Any]]:
    """The runner that holds the transformer's weights and its ``linear_weights()``, once every LoRA of ``loras``
    is checked to fit them (their shapes only: an FP8 engine's weights are dequantized when read).

    Raises:
        InputError: a runner whose weights cannot be replaced (say which backend build can), or a LoRA that does
            not fit the transformer.
    """
    target = engine_runner(runner)
    if not hasattr(target, "set_linear_weights"):
        raise InputError(
            f"--lora: the {type(target).__name__} transformer engine cannot take new weights: use engines built "
            "with --backend onnxruntime, or aotinductor with --aoti-weights external"
        )
    if not loras:
        return target, {}
    base = target.linear_weights()
    shapes = weight_shapes(base)
    for lora in loras:
        check_fits(lora, shapes, where)
    return target, base


def apply_to_runner(runner: Any, loras: Sequence[Lora], where: str = "engine's",
                    scales: Sequence[float] | None = None) -> Mapping[str, Any]:  # fmt: skip
    """Merge ``loras`` (each at its spec's scale, or at ``scales``) into the transformer ``runner``'s weights; none
    (or all at scale 0): the originals, bit for bit. Returns the merged weights handed over (module -> tensor,
    computed when read).

    Raises:
        InputError: a runner whose weights cannot be replaced (say which backend build can), or a LoRA that does
            not fit the transformer; the runner is then unchanged.
    """
    scales = [lora.spec.scale for lora in loras] if scales is None else list(scales)
    if len(scales) != len(loras):
        raise ValueError(f"{len(scales)} scales for {len(loras)} LoRAs")
    target, base = check_runner(runner, loras, where)
    if not loras:
        target.set_linear_weights(None)
        return {}
    merged = MergedWeights(base, loras, scales)
    target.set_linear_weights(merged if merged else None)
    return merged
