"""LoRA on a PyTorch transformer: diffusers' loader puts each LoRA on the model as a peft adapter, ``set_adapters``
gives their scales, ``fuse_lora`` merges them into the weights and the adapters are unloaded, so the model runs as
fast as without; the originals of the weights it changed are kept for ``unfuse`` (exact)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fluxtrt.errors import MissingDependencyError
from fluxtrt.lora.files import Lora, check_fits


def linear_shapes(transformer: Any) -> dict[str, tuple[int, int]]:
    """Module name -> weight shape of every linear of a diffusers transformer."""
    import torch

    return {n: tuple(m.weight.shape) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}


def check_model(transformer: Any, loras: Sequence[Lora]) -> None:
    """Raise InputError unless every LoRA of ``loras`` fits ``transformer``'s linears."""
    shapes = linear_shapes(transformer)
    for lora in loras:
        check_fits(lora, shapes, "model's")


def fuse(transformer: Any, loras: Sequence[Lora]) -> dict[str, Any]:
    """Fuse ``loras`` (each at its spec's scale) into ``transformer``'s weights, in their dtype. Returns the
    originals of the weights it changed (module -> tensor), for ``unfuse``.

    Raises:
        MissingDependencyError: peft is not installed.
        InputError: a LoRA that does not fit; the model is then unchanged.
    """
    import importlib.util

    import torch

    if importlib.util.find_spec("peft") is None:
        raise MissingDependencyError("peft", "--lora on a PyTorch model", "pip install 'fluxtrt[lora]'")
    check_model(transformer, loras)
    modules = dict(transformer.named_modules())
    targets = sorted({m for lora in loras for m in lora.layers})
    originals = {m: modules[m].weight.detach().clone() for m in targets}
    names = [f"fluxtrt_{i}_{lora.name}" for i, lora in enumerate(loras)]
    try:
        with torch.no_grad():
            for name, lora in zip(names, loras, strict=True):
                transformer.load_lora_adapter(dict(lora.state_dict), network_alphas=lora.alphas, prefix="transformer",
                                              adapter_name=name)  # fmt: skip
            transformer.set_adapters(names, [lora.spec.scale for lora in loras])
            transformer.fuse_lora(adapter_names=names)
            transformer.unload_lora()  # the peft layers go; the fused weights stay in the base linears
            _forget_adapters(transformer)
    except BaseException:
        if getattr(transformer, "_hf_peft_config_loaded", False):
            transformer.unload_lora()
        _forget_adapters(transformer)
        unfuse(transformer, originals)
        raise
    return originals


def unfuse(transformer: Any, originals: dict[str, Any]) -> None:
    """Put back the weights ``fuse`` changed, bit for bit."""
    import torch

    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for name, weight in originals.items():
            modules[name].weight.copy_(weight)


def _forget_adapters(transformer: Any) -> None:
    """Drop the adapters' configuration that unloading leaves, so a later ``fuse`` starts from a plain model."""
    if hasattr(transformer, "peft_config"):
        del transformer.peft_config
    transformer._hf_peft_config_loaded = False
