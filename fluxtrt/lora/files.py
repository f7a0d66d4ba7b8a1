"""Reading LoRA files: ``FILE[:SCALE]`` specs, and the file's low-rank updates per transformer linear, read through
diffusers' FLUX LoRA loader (its own format, kohya / ai-toolkit, XLabs), checked against the transformer's linears."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxtrt.errors import InputError

FORMAT_HINT = "a FLUX transformer LoRA in diffusers, kohya/ai-toolkit or XLabs format"


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora FILE[:SCALE]``: the file and the strength its update is added with (1.0 by default)."""

    path: Path
    scale: float = 1.0

    @property
    def name(self) -> str:
        return self.path.stem

    @classmethod
    def parse(cls, text: str, option: str = "--lora") -> LoraSpec:
        """``FILE`` or ``FILE:SCALE`` (a path holding ``:`` is taken whole when it exists).

        Raises:
            InputError: a scale that is not a finite number, or a file that does not exist.
        """
        path, scale = Path(text), 1.0
        if not path.exists() and ":" in text:
            head, _, tail = text.rpartition(":")
            try:
                scale = float(tail)
            except ValueError:
                raise InputError(
                    f"{option} '{text}': the scale '{tail}' is not a number; expected FILE[:SCALE] such as {head}:0.8"
                ) from None
            if scale != scale or scale in (float("inf"), float("-inf")):
                raise InputError(f"{option} '{text}': the scale is {tail}, expected a finite number such as 0.8")
            path = Path(head)
        if not path.is_file():
            raise InputError(f"{option} '{text}': {path} is not a file; pass a .safetensors LoRA as FILE[:SCALE]")
        return cls(path, scale)


@dataclass
class LoraLayer:
    """The update of one linear: ``weight += scale * alpha_scale * up @ down`` (``down`` [rank, in], ``up`` [out,
    rank])."""

    down: Any
    up: Any
    alpha_scale: float = 1.0

    def delta(self, scale: float, device: Any = None) -> Any:
        """The update to add to the linear's weight, in FP32 (on ``device``, else where the LoRA is)."""
        return (self.up.to(device).float() @ self.down.to(device).float()) * (scale * self.alpha_scale)


@dataclass
class Lora:
    """A LoRA file read: its spec, its per-module updates (module names as in diffusers' FLUX transformer)."""

    spec: LoraSpec
    layers: dict[str, LoraLayer] = field(default_factory=dict)
    state_dict: dict[str, Any] = field(default_factory=dict)  # diffusers' form, for peft
    alphas: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.spec.name


def read_loras(specs: Sequence[str], option: str = "--lora") -> list[Lora]:
    """The ``FILE[:SCALE]`` LoRAs read, in order (before any model is loaded, so that a bad one costs nothing).

    Raises:
        InputError: as ``LoraSpec.parse`` and ``read_lora``.
    """
    return [read_lora(LoraSpec.parse(text, option)) for text in specs]


def lora_label(loras: Sequence[Lora]) -> str:
    """`` + LoRA NAME:SCALE`` per LoRA, for reports."""
    return "".join(f" + LoRA {lora.name}:{lora.spec.scale:g}" for lora in loras)


def read_lora(spec: LoraSpec) -> Lora:
    """Read ``spec``'s file through diffusers' FLUX loader.

    Raises:
        InputError: not a safetensors file, text-encoder updates (not supported), or keys that are no LoRA.
    """
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = spec.path
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"--lora {path} is not a readable safetensors file ({str(exc)[:120]}): pass "
                         f"{FORMAT_HINT}") from None  # fmt: skip
    try:
        state, alphas = FluxLoraLoaderMixin.lora_state_dict(raw, return_alphas=True)
    except (ValueError, KeyError) as exc:
        raise InputError(f"--lora {path}: diffusers' FLUX loader cannot read it ({str(exc)[:160]}): pass "
                         f"{FORMAT_HINT}") from None  # fmt: skip
    encoder = sorted(k for k in state if k.startswith(("text_encoder", "lora_te")))
    if encoder:
        raise InputError(f"--lora {path} updates the text encoders ({encoder[0]}, ...), which fluxtrt does not "
                         "support: use a LoRA of the transformer only")  # fmt: skip
    return Lora(spec, _layers(path, state, alphas or {}), state, alphas or None)


def _layers(path: Path, state: Mapping[str, Any], alphas: Mapping[str, Any]) -> dict[str, LoraLayer]:
    layers: dict[str, LoraLayer] = {}
    other = []
    for key, value in state.items():
        name = key.removeprefix("transformer.")
        for part, attr in ((".lora_A.weight", "down"), (".lora_B.weight", "up")):
            if name.endswith(part):
                module = name[: -len(part)]
                layer = layers.setdefault(module, LoraLayer(None, None))
                setattr(layer, attr, value)
                break
        else:
            other.append(key)
    incomplete = sorted(m for m, layer in layers.items() if layer.down is None or layer.up is None)
    if other or incomplete or not layers:
        what = ", ".join((other + incomplete)[:3]) or "no lora_A/lora_B pairs"
        raise InputError(f"--lora {path}: keys that are no LoRA update ({what}): pass {FORMAT_HINT}")
    for module, layer in layers.items():
        alpha = alphas.get(f"transformer.{module}.alpha", alphas.get(f"{module}.alpha"))
        if alpha is not None:
            layer.alpha_scale = float(alpha) / layer.down.shape[0]
    return layers


def check_fits(lora: Lora, shapes: Mapping[str, Sequence[int]], where: str) -> None:
    """Raise unless every module ``lora`` updates is a linear of ``shapes`` (module -> weight [out, in]) whose shape
    the update has.

    Raises:
        InputError: modules that match no linear (a few named), or an update whose shape does not fit.
    """
    unknown = sorted(m for m in lora.layers if m not in shapes)
    if unknown:
        some = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise InputError(f"--lora {lora.spec.path}: {len(unknown)} of its {len(lora.layers)} modules match no linear "
                         f"of the {where} transformer ({some}): pass a LoRA made for FLUX.1 / Kontext")  # fmt: skip
    for module, layer in lora.layers.items():
        out, inp = shapes[module]
        rank = layer.down.shape[0]
        if tuple(layer.down.shape) != (rank, inp) or tuple(layer.up.shape) != (out, rank):
            raise InputError(
                f"--lora {lora.spec.path}: {module} has lora_A {tuple(layer.down.shape)} and lora_B "
                f"{tuple(layer.up.shape)}, which do not fit its weight [{out}, {inp}] (expected [{rank}, {inp}] and "
                f"[{out}, {rank}]): the LoRA was made for another model size"
            )
