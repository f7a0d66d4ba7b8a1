"""Loading for the 24 GB mode (DESIGN 13): a 1024x1024 edit stays within 20 GiB of GPU memory, and the device never
holds more than what the edit keeps there.

What lives where, FLUX.1-Kontext in bf16 with FP8 linears:
- transformer on the GPU: 8.6B token-wise linear weights in FP8 (8.6 GB) + 3.3B in bf16 (the AdaLN modulation
  linears, embedders, output layers: 6.6 GB) = 14.2 GiB; with fused QKV the unfused Q/K/V projections (2.15B
  parameters, 4.3 GB in bf16, which stage 3 keeps beside the fused ones) are dropped;
- text encoders on the host, streamed through the GPU (``fluxtrt.models.offload.HostOffload``): T5-XXL one block
  (0.39 GB) at a time, CLIP whole (0.25 GB), nothing once they have run;
- VAE on the GPU (0.17 GB), tiled above 1024 px a side.

The transformer reaches the device one top-level part at a time (embedders, then each block, then the output
layers), and each block goes through ``place_block`` (``BlockPlacer``: fuse, quantize) as soon as it is there, so
the device never holds more than the placed blocks plus one unplaced block, and loading never holds the bf16
transformer (23.8 GB). The text encoders stay on the host (pinned on CUDA, for fast copies); the VAE goes to the
device.

``random-full`` builds its parts directly on the device with the seeds ``build_synthetic`` uses, the transformer
through the meta device and each part's own initialisers called in construction order, so its weights equal the
ones the normal loader builds. Other models load on the host and move.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fluxtrt.errors import FluxtrtError
from fluxtrt.models.components import FluxKontextComponents

PlaceBlock = Callable[[str, Any], None]  # (name such as "transformer_blocks.3", block on the device)

# Q/K/V projections that a fused attention module no longer calls.
_UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


class BlockPlacer:
    """Fuses and quantizes each transformer block as it arrives on the device (a ``PlaceBlock``).

    Args:
        fuse_qkv: fuse each attention's Q/K/V projections and free the unfused ones.
        quant: the torchao linears (``fp8``, ``fp4``), or None.
        device: where the blocks arrive.
        strict: raise when the quantization is unavailable instead of loading the blocks unquantized (``fp4``
            always raises).

    Attributes:
        quant_path: the linears' precision path, or None when unquantized.
        quantized, dropped: counts of quantized linears and of dropped unfused projections.

    Raises:
        DeviceError, MissingDependencyError: with ``strict`` or ``fp4``, no such linears here.
    """

    def __init__(self, fuse_qkv: bool, quant: str | None, device: Any, strict: bool):
        self.fuse = fuse_qkv
        self.quant, self.torchao, self.quant_path = None, None, None
        self.quantized = self.dropped = 0
        if quant is not None:
            from fluxtrt.models.torchao_linears import torchao_config

            try:
                self.torchao, path = torchao_config(quant, device)
                self.quant, self.quant_path = quant, path
            except FluxtrtError:
                if strict or quant == "fp4":
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
            from fluxtrt.models.torchao_linears import quantize_block

            self.quantized += quantize_block(block, name, self.torchao)


def load_components_low_vram(
    model: str, device: str, dtype: str, seed: int = 0, place_block: PlaceBlock | None = None
) -> FluxKontextComponents:
    """Load ``model`` for the 24 GB mode: transformer and VAE on ``device``, text encoders on the host.

    Args:
        model: ``tiny``, ``random-full`` or a checkpoint (as ``load_components``).
        device: where the transformer and VAE run.
        dtype: ``fp32`` or ``bf16``.
        seed: initialisation seed of the synthetic models.
        place_block: called with each transformer block once it is on ``device``, before the next one moves.

    Raises:
        ModelLoadError, DeviceError: as ``load_components``; DeviceError also when the host cannot hold the
            text encoders of ``random-full``.
    """
    from fluxtrt.models.loading import load_components, torch_dtype

    place = place_block or (lambda name, block: None)
    if model == "random-full":
        return _random_full(device, torch_dtype(dtype), seed, place)
    components = load_components(model, "cpu", dtype, seed)
    place_transformer(components.transformer, device, place)
    components.vae.to(device)
    pin_text_encoders(components, device)
    return components


def place_transformer(transformer: Any, device: Any, place: PlaceBlock) -> None:
    """Move a host transformer to ``device`` part by part, passing each block to ``place`` once it is there."""
    import torch

    for name, child in transformer.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for i, block in enumerate(child):
                block.to(device)
                place(f"{name}.{i}", block)
        else:
            child.to(device)


def materialize_transformer(config: dict, seed: int, device: Any, dtype: Any, place: PlaceBlock) -> Any:
    """The seeded ``FluxTransformer2DModel`` of ``config`` built on ``device`` part by part: the same weights as
    ``build_transformer(config, seed, device, dtype)``, without ever holding the whole unplaced model."""
    model = meta_transformer(config, dtype)
    materialize(model, seed, device, place)
    return model


def meta_transformer(config: dict, dtype: Any) -> Any:
    """``FluxTransformer2DModel(**config)`` on the meta device (no memory, no initialisation), in eval mode."""
    from diffusers import FluxTransformer2DModel

    from fluxtrt.models.synthetic import constructing

    with constructing("meta", dtype):
        model = FluxTransformer2DModel(**config)
    return model.eval().requires_grad_(False)


def materialize(model: Any, seed: int, device: Any, place: PlaceBlock) -> None:
    """Allocate a meta model's parts on ``device`` one at a time and run their modules' ``reset_parameters`` (the
    initialisers their constructors call) in construction order from ``seed``; each block goes through ``place``
    before the next is allocated."""
    import torch

    torch.manual_seed(seed)
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for i, block in enumerate(child):
                _initialise(block, device)
                place(f"{name}.{i}", block)
        else:
            _initialise(child, device)


def _initialise(module: Any, device: Any) -> None:
    """Allocate ``module``'s tensors on ``device`` and initialise them as construction did, in module order."""
    module.to_empty(device=device)
    for sub in module.modules():
        if next(sub.parameters(recurse=False), None) is None and next(sub.buffers(recurse=False), None) is None:
            continue
        if not hasattr(sub, "reset_parameters"):
            raise RuntimeError(f"{type(sub).__name__} holds tensors but has no reset_parameters to initialise them")
        sub.reset_parameters()


def pin_text_encoders(components: FluxKontextComponents, device: Any) -> None:
    """Keep the text encoders on the host; on CUDA in page-locked memory, so copies to the GPU run at full speed."""
    import torch

    for encoder in (components.text_encoder, components.text_encoder_2):
        encoder.to("cpu")
        if torch.device(device).type == "cuda":
            for tensor in [*encoder.parameters(), *encoder.buffers()]:
                tensor.data = tensor.data.pin_memory()


def _random_full(device: str, dtype: Any, seed: int, place: PlaceBlock) -> FluxKontextComponents:
    """random-full for the 24 GB mode: text encoders built on ``device`` and moved to the host one at a time, VAE on
    ``device``, transformer materialized part by part."""
    import torch

    from fluxtrt.environment import check_memory
    from fluxtrt.models.synthetic import FULL, build_text_encoders, build_vae

    host_bytes = round(4.72e9 * dtype.itemsize * 1.1)  # CLIP-L + T5-XXL encoder, plus headroom
    check_memory(host_bytes, "cpu", "--model random-full's text encoders on the host (low-VRAM)", "use more memory")
    text_encoder, tokenizer, text_encoder_2, tokenizer_2 = build_text_encoders(FULL, seed, device, dtype)
    components = FluxKontextComponents(
        transformer=None,
        vae=build_vae(FULL, seed, device, dtype).eval().requires_grad_(False),
        text_encoder=text_encoder.eval().requires_grad_(False),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval().requires_grad_(False),
        tokenizer_2=tokenizer_2,
        source="random-full",
    )
    pin_text_encoders(components, device)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # T5's 9.5 GB go back before the transformer arrives
    components.transformer = materialize_transformer(FULL.transformer, seed, device, dtype, place)
    return components
