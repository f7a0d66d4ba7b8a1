"""The 24 GB mode of the stages (``lowvram=on``, DESIGN 13): the stage's fused QKV and quantization become the
model's loading options, and the model loads as ``infer --low-vram`` loads it (``fluxtrt.models.options``)."""

from __future__ import annotations

from fluxtrt.models.options import ModelOptions, load_model
from fluxtrt.stages.apply import StagedModel
from fluxtrt.stages.config import StageConfig


def load_low_vram(model: str, device: str, dtype: str, config: StageConfig, seed: int = 0, tiny_vae: str = "tiny",
                  strict: bool = False) -> StagedModel:  # fmt: skip
    """``model`` loaded for the 24 GB mode as ``config`` (a stage with ``low_vram``) wants it.

    Args:
        model, device, dtype, seed: as ``fluxtrt.models.load_components``.
        config: the stage: its fused QKV and quantization are applied block by block during the load.
        tiny_vae: the slim autoencoder of ``vae=tiny`` stages.
        strict: raise when the quantization is unavailable here (on CUDA a bf16 transformer does not fit 20 GiB).

    Returns:
        The staged model: ``apply(config)`` gives its runners and reports what could not be applied.

    Raises:
        DeviceError, MissingDependencyError: with ``strict``, no FP8 here; FP4 below sm100 always.
        ModelLoadError: as ``load_components``.
    """
    options = ModelOptions(model, device, dtype, seed, low_vram=True, fuse_qkv=config.fuse_qkv, quant=config.quant,
                           strict=strict)  # fmt: skip
    return StagedModel.from_model(load_model(options), tiny_vae=tiny_vae)
