"""How a model is loaded for an edit on PyTorch: ``ModelOptions`` (the slim autoencoder, the 24 GB mode and what that
mode does to each transformer block on its way to the device) and ``load_model``, which ``infer`` and the PyTorch
stages both call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fluxtrt.models.components import FluxKontextComponents


@dataclass(frozen=True)
class ModelOptions:
    """What ``load_model`` loads, where, and how.

    Args:
        model: ``tiny``, ``random-full``, a checkpoint directory or a cached hub id (as ``load_components``).
        device: where the model runs (``cpu``, ``cuda``).
        dtype: ``fp32`` or ``bf16``.
        seed: initialisation seed of the synthetic models and of a random slim autoencoder.
        vae: the slim autoencoder in place of the model's VAE: ``tiny`` (random weights) or an AutoencoderTiny
            directory; None keeps the model's own.
        low_vram: the 24 GB mode (DESIGN 13, ``fluxtrt.models.lowvram``): the transformer placed block by block,
            the text encoders kept on the host and streamed through the device, the VAE tiled above its tile size.
        fuse_qkv: in the 24 GB mode, fuse each block's Q/K/V projections as it arrives (freeing the unfused ones).
        quant: in the 24 GB mode, the torchao linears each block gets as it arrives (``fp8``, ``fp4``), or None.
        strict: raise when ``quant`` is unavailable here instead of loading the linears unquantized.
        parts: load only these models (``transformer``, ``vae``, ``text_encoder``, ``text_encoder_2``; the others
            are None) with the weights a whole load gives them; None loads all four.

    Raises:
        ValueError: ``fuse_qkv`` or ``quant`` without ``low_vram``; ``parts`` with ``low_vram``.
    """

    model: str
    device: str = "cpu"
    dtype: str = "fp32"
    seed: int = 0
    vae: str | None = None
    low_vram: bool = False
    fuse_qkv: bool = False
    quant: str | None = None
    strict: bool = False
    parts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.fuse_qkv or self.quant is not None) and not self.low_vram:
            raise ValueError("fuse_qkv and quant are applied while loading in the 24 GB mode only (low_vram=True)")
        if self.parts is not None and self.low_vram:
            raise ValueError("parts loads a subset of the models as they are; the 24 GB mode loads them all")

    @classmethod
    def low_vram_mode(cls, model: str, device: str, dtype: str, vae: str | None = None) -> ModelOptions:
        """The 24 GB mode of ``fluxtrt infer --low-vram``: on CUDA FP8 linears are required (a bf16 transformer does
        not fit); on the CPU nothing is quantized and the placement changes nothing but the order of work."""
        cuda = device.startswith("cuda")
        return cls(model, device, dtype, vae=vae, low_vram=True, quant="fp8" if cuda else None, strict=cuda)


@dataclass
class LoadedModel:
    """A model loaded as its ``options`` say.

    Attributes:
        components: the loaded components, with the slim autoencoder in place of the VAE if asked for.
        options: what it was loaded with.
        offloads: in the 24 GB mode, the text encoders' ``fluxtrt.models.offload.HostOffload`` by runner name
            (``clip``, ``t5``); empty otherwise.
        quant: the linears quantized while loading (``fp8``, ``fp4``), or None (unasked, or unavailable here).
        quant_path: their precision path and count, or None.
    """

    components: FluxKontextComponents
    options: ModelOptions
    offloads: dict[str, Any] = field(default_factory=dict)
    quant: str | None = None
    quant_path: str | None = None

    @property
    def fused(self) -> bool:
        """Q/K/V fused while loading."""
        return self.options.low_vram and self.options.fuse_qkv


def load_model(options: ModelOptions) -> LoadedModel:
    """Load a model as ``options`` say.

    Raises:
        ModelLoadError: as ``fluxtrt.models.load_components``, or ``options.vae`` is not a usable AutoencoderTiny.
        DeviceError: the model would not fit the device; in the 24 GB mode, with ``strict``, no FP8 linears here.
        MissingDependencyError: in the 24 GB mode, with ``strict``, no torchao.
    """
    from fluxtrt.models.loading import check_slim_vae, load_components, use_slim_vae

    if not options.low_vram:
        components = load_components(options.model, options.device, options.dtype, options.seed, vae=options.vae,
                                     parts=options.parts)  # fmt: skip
        return LoadedModel(components, options)
    from fluxtrt.models.lowvram import BlockPlacer, load_components_low_vram
    from fluxtrt.models.offload import HostOffload, text_encoder_groups

    if options.vae is not None:
        check_slim_vae(options.vae)
    placer = BlockPlacer(options.fuse_qkv, options.quant, options.device, options.strict)
    components = load_components_low_vram(options.model, options.device, options.dtype, options.seed, placer)
    if options.vae is not None:
        use_slim_vae(components, options.vae, options.seed)
    clip_groups, t5_groups = text_encoder_groups(components.text_encoder, components.text_encoder_2)
    offloads = {
        "clip": HostOffload(clip_groups, options.device, components.text_encoder),
        "t5": HostOffload(t5_groups, options.device, components.text_encoder_2),
    }
    if placer.quant is None:
        return LoadedModel(components, options, offloads)
    quant_path = f"{placer.quant_path}, {placer.quantized} linears, quantized while loading"
    return LoadedModel(components, options, offloads, placer.quant, quant_path)
