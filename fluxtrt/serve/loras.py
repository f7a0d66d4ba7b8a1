"""LoRAs a server (``fluxtrt serve --lora``) or a file of edits (``fluxtrt infer --edits --lora``) loads once and
switches between: ``[NAME=]FILE[:SCALE]`` specs read before anything else is loaded, checked against the loaded
transformer, and merged into its weights (an engine's, through its runner) or fused into them (a PyTorch model's) as
each batch needs; switching back to none restores the original weights bit for bit."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from fluxtrt.errors import InputError
from fluxtrt.lora.files import Lora, LoraSpec

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# The strengths a request may ask for: far beyond any LoRA's useful range, short of weights that overflow.
MAX_LORA_SCALE = 10.0
# What a batch runs with: (name, scale) per LoRA, in order; () for none.
Selection = tuple[tuple[str, float], ...]


def split_served(text: str, option: str = "--lora") -> tuple[str, LoraSpec]:
    """``NAME=FILE[:SCALE]`` or ``FILE[:SCALE]`` (named by the file's stem) as (name, spec); torch-free.

    Raises:
        InputError: a name that is not letters, digits, ``_.-``, or as ``LoraSpec.parse``.
    """
    head, sep, tail = text.partition("=")
    if sep and NAME.fullmatch(head):
        return head, LoraSpec.parse(tail, f"{option} {head}=")
    if sep and "/" not in head and "\\" not in head:
        raise InputError(f"{option} '{text}': the name '{head}' is not 1-64 letters, digits, '_', '.' or '-' "
                         "from a letter or digit; pass NAME=FILE[:SCALE], e.g. style=style.safetensors")  # fmt: skip
    spec = LoraSpec.parse(text, option)
    if not NAME.fullmatch(spec.name):
        raise InputError(f"{option} '{text}': the file's stem '{spec.name}' is no usable name; name it: "
                         f"NAME={text}")  # fmt: skip
    return spec.name, spec


def check_served(texts: Sequence[str], option: str = "--lora") -> dict[str, LoraSpec]:
    """Name -> spec of every ``[NAME=]FILE[:SCALE]``, each name once; torch-free, before anything is read.

    Raises:
        InputError: as ``split_served``, or a name given twice.
    """
    specs: dict[str, LoraSpec] = {}
    for text in texts:
        name, spec = split_served(text, option)
        if name == "none":
            raise InputError(f"{option} '{text}': 'none' stands for no LoRA; name it: NAME=FILE")
        if name in specs:
            raise InputError(f"{option} '{text}': the name '{name}' is taken by {specs[name].path}; name one of "
                             f"them: NAME=FILE")  # fmt: skip
        specs[name] = spec
    return specs


def read_served(texts: Sequence[str], option: str = "--lora") -> dict[str, Lora]:
    """Name -> the LoRA read (its spec's scale: the default of a request that gives none).

    Raises:
        InputError: as ``check_served`` and ``fluxtrt.lora.files.read_lora``.
    """
    from fluxtrt.lora.files import read_lora

    return {name: read_lora(spec) for name, spec in check_served(texts, option).items()}


def parse_scale(text: Any, param: str = "lora_scale") -> float:
    """A LoRA strength: a finite number from -``MAX_LORA_SCALE`` to ``MAX_LORA_SCALE``.

    Raises:
        InputError: anything else.
    """
    try:
        value = float(str(text).strip()) if not isinstance(text, bool) else float("nan")
    except ValueError:
        value = float("nan")
    if not -MAX_LORA_SCALE <= value <= MAX_LORA_SCALE:  # also refuses nan
        raise InputError(f"{param} is '{text}', expected a number from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g} "
                         "(1 is the LoRA's own strength, 0 leaves it out)")  # fmt: skip
    return value


class LoraSwitch:
    """The LoRAs merged into a loaded pipeline's transformer now: ``use`` switches to another selection (none,
    one, or several at their scales) before a batch runs.

    Args:
        pipeline: a loaded ``KontextPipeline`` over a PyTorch model or engines.
        loras: name -> LoRA read.

    Raises:
        InputError: an engine whose weights cannot be replaced, or a LoRA that does not fit the transformer (the
            first one, with the modules or shapes it misses); nothing is changed.
    """

    def __init__(self, pipeline: Any, loras: Mapping[str, Lora]):
        self.loras = dict(loras)
        self.active: Selection = ()
        self._originals: dict[str, Any] = {}  # a PyTorch model's weights before the fused LoRAs
        runner = pipeline.runners["transformer"]
        self.module = getattr(getattr(runner, "module", None), "transformer", None)  # a TorchRunner's model
        if self.module is not None:
            from fluxtrt.lora.fuse import check_model

            check_model(self.module, list(self.loras.values()))
        else:
            from fluxtrt.lora.engines import check_runner

            self.runner = runner
            check_runner(runner, list(self.loras.values()))

    def use(self, selection: Selection) -> None:
        """Merge the LoRAs ``selection`` names, at its scales, in place of the ones merged now (nothing when they are
        the same); () restores the original weights exactly.

        Raises:
            KeyError: a name this switch does not hold (requests are checked against ``loras`` before).
        """
        if selection == self.active:
            return
        chosen = [replace(self.loras[name], spec=replace(self.loras[name].spec, scale=scale))
                  for name, scale in selection]  # fmt: skip
        if self.module is None:
            from fluxtrt.lora.engines import apply_to_runner

            apply_to_runner(self.runner, chosen)  # on failure the runner, and so ``active``, is unchanged
        else:
            from fluxtrt.lora.fuse import fuse, unfuse

            unfuse(self.module, self._originals)
            self._originals, self.active = {}, ()
            if chosen:
                self._originals = fuse(self.module, chosen)
        self.active = selection

    def close(self) -> None:
        """Back to the original weights."""
        self.use(())


def describe(loras: Mapping[str, Lora]) -> list[dict[str, Any]]:
    """Per LoRA: its name, file name, default scale and how many linears it changes."""
    return [{"name": name, "file": lora.spec.path.name, "scale": lora.spec.scale, "modules": len(lora.layers)}
            for name, lora in loras.items()]  # fmt: skip
