"""The 24 GB mode (DESIGN 13): a stage's model loaded so that a 1024x1024 edit stays within 20 GiB of GPU memory.

What lives where, FLUX.1-Kontext in bf16 with FP8 linears:
- transformer on the GPU: 8.6B token-wise linear weights in FP8 (8.6 GB) + 3.3B in bf16 (the AdaLN modulation
  linears, embedders, output layers: 6.6 GB) = 14.2 GiB; with fused QKV the unfused Q/K/V projections (2.15B
  parameters, 4.3 GB in bf16, which stage 3 keeps beside the fused ones) are dropped;
- text encoders on the host, streamed through the GPU (``HostOffload``): T5-XXL one block (0.39 GB) at a time, CLIP
  whole (0.25 GB), nothing once they have run;
- VAE on the GPU (0.17 GB), tiled above 1024 px a side.

Each block reaches the GPU on its own and is fused and quantized there before the next one moves
(``fluxtrt.models.lowvram``), so loading never holds the bf16 transformer (23.8 GB) either.
"""

from __future__ import annotations

from typing import Any

from fluxtrt.errors import FluxtrtError
from fluxtrt.stages.apply import StagedModel
from fluxtrt.stages.config import StageConfig
from fluxtrt.stages.offload import HostOffload, text_encoder_groups

# Q/K/V projections that a fused attention module no longer calls.
_UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


class BlockPlacer:
    """Fuses and quantizes each transformer block as it arrives on the device (``place_block`` of the loader).

    Args:
        config: the stage whose fusion and quantization the blocks get.
        device: where the blocks arrive.
        strict: raise when the quantization is unavailable instead of loading the blocks unquantized.

    Attributes:
        quant_path: the linears' precision path, or None when unquantized (``apply`` reports why).
        quantized, dropped: counts of quantized linears and of dropped unfused projections.
    """

    def __init__(self, config: StageConfig, device: Any, strict: bool):
        self.fuse = config.fuse_qkv
        self.quant, self.torchao, self.quant_path = None, None, None
        self.quantized = self.dropped = 0
        if config.quant is not None:
            from fluxtrt.stages.torchao_linears import torchao_config

            try:
                self.torchao, path = torchao_config(config.quant, device)
                self.quant, self.quant_path = config.quant, path
            except FluxtrtError:
                if strict or config.quant == "fp4":
                    raise

    def __call__(self, name: str, block: Any) -> None:
        import torch
        from diffusers.models.attention import AttentionModuleMixin

        if self.fuse:
            for module in block.modules():
                if isinstance(module, AttentionModuleMixin) and module._supports_qkv_fusion:
                    module.fuse_projections()
                    for attr in _UNFUSED:
                        unused = getattr(module, attr, None)
                        if unused is not None:
                            unused.to("meta")  # frees its weights; nothing calls it once fused
                            self.dropped += 1
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        if self.torchao is not None:
            from fluxtrt.stages.torchao_linears import quantize_block

            self.quantized += quantize_block(block, name, self.torchao)


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
    from fluxtrt.models.lowvram import load_components_low_vram

    placer = BlockPlacer(config, device, strict)
    components = load_components_low_vram(model, device, dtype, seed, placer)
    staged = StagedModel(components, tiny_vae=tiny_vae, seed=seed)
    staged.low_vram = True
    staged.fused = placer.fuse
    if placer.quant is not None:
        staged.quant = placer.quant
        staged.quant_path = f"{placer.quant_path}, {placer.quantized} linears, quantized while loading"
    clip_groups, t5_groups = text_encoder_groups(components.text_encoder, components.text_encoder_2)
    staged.offloads = {
        "clip": HostOffload(clip_groups, device, components.text_encoder),
        "t5": HostOffload(t5_groups, device, components.text_encoder_2),
    }
    return staged
