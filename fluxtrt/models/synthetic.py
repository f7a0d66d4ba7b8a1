"""Models made from configs instead of downloaded weights.

``tiny``: the FLUX.1-Kontext architecture classes shrunk to 1+1 transformer blocks with 2 heads, a 4-level VAE of 16
channels and 2-layer CLIP and T5; seeded, built on the CPU in about a second. ``random-full``: the released
architecture at full size with random weights, for latency work on a GPU (same shapes and kernels, meaningless
pixels).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fluxtrt.models.components import PARTS, FluxKontextComponents
from fluxtrt.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer


@dataclass(frozen=True)
class SyntheticConfigs:
    """Constructor arguments of the four model classes (tokenizer-dependent ids are filled in at build time)."""

    transformer: dict
    vae: dict
    clip: dict
    t5: dict


_VAE_BLOCKS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "sample_size": 1024,  # FLUX's: diffusers' VAE tiling (the low-VRAM mode) tiles only images over 1024 px a side
}

TINY = SyntheticConfigs(
    transformer={
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": [4, 6, 6],
    },
    vae={**_VAE_BLOCKS, "block_out_channels": [16, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8},
    clip={
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 32,
    },
    t5={
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 37,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": "gated-gelu",
    },
)

# FLUX.1-Kontext-dev: 19 double + 38 single blocks of 24 heads x 128; CLIP-L; T5-XXL; the 16-channel FLUX VAE.
FULL = SyntheticConfigs(
    transformer={
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": [16, 56, 56],
    },
    vae={**_VAE_BLOCKS, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32},
    clip={
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    t5={
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "feed_forward_proj": "gated-gelu",
    },
)

# FULL's widths with two blocks of each kind and two-layer text encoders (``random-full-2blocks``): every kernel of the
# real checkpoint runs at its real shapes (24 heads x 128, 3072 hidden, T5's 4096, the VAE's channels) in a model of
# about 1.5B parameters, for testing the GPU paths in seconds.
FULL_2BLOCKS = SyntheticConfigs(
    transformer={**FULL.transformer, "num_layers": 2, "num_single_layers": 2},
    vae=FULL.vae,
    clip={**FULL.clip, "num_hidden_layers": 2},
    t5={**FULL.t5, "num_layers": 2},
)

# Parameters of each model of FULL (tests/test_cli.py counts them on the meta device). What random-full's weights
# need: 4 bytes each in fp32, 2 in bf16.
FULL_PART_PARAMETERS = {
    "transformer": 11_901_408_320,
    "vae": 83_819_683,
    "text_encoder": 85_515_264,  # CLIP-L text
    "text_encoder_2": 4_631_222_272,  # T5-XXL encoder
}
FULL_PARAMETERS = sum(FULL_PART_PARAMETERS.values())  # 16,701,965,539


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@contextmanager
def constructing(device: Any, dtype: Any) -> Iterator[None]:
    """Modules constructed inside are allocated on ``device`` in ``dtype`` directly (no fp32 CPU copy first)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(config: dict, seed: int, device: Any, dtype: Any) -> Any:
    """A seeded ``FluxTransformer2DModel`` from constructor arguments, in eval mode without gradients."""
    import torch
    from diffusers import FluxTransformer2DModel

    with constructing(device, dtype):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**config)
    return model.eval().requires_grad_(False)


def build_synthetic(
    configs: SyntheticConfigs, seed: int, device: Any, dtype: Any, source: str, parts: Iterable[str] | None = None
) -> FluxKontextComponents:
    """Construct the four models (or only ``parts`` of them) with seeded default initialisation directly on
    ``device`` in ``dtype``.

    The library initialisers (diffusers' and transformers' own) keep activations finite through a whole edit at
    full size: every linear layer shrinks its input's scale and every residual branch is normalised and gated.
    Each model is seeded on its own (transformer ``seed``, VAE ``seed + 1``, CLIP ``+ 2``, T5 ``+ 3``), so any one
    of them can be built apart with the same weights (``parts``, ``build_vae``, the low-VRAM loader).

    Args:
        parts: the models to build (names of ``PARTS``); None builds all four. The others are left None; both
            tokenizers are always built (they hold no weights).
    """
    wanted = set(PARTS if parts is None else parts)
    transformer = build_transformer(configs.transformer, seed, device, dtype) if "transformer" in wanted else None
    vae = build_vae(configs, seed, device, dtype) if "vae" in wanted else None
    encoders = [p for p in TEXT_ENCODERS if p in wanted]
    text_encoder, tokenizer, text_encoder_2, tokenizer_2 = build_text_encoders(configs, seed, device, dtype, encoders)
    components = FluxKontextComponents(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        source=source,
    )
    return components.to(device, dtype)


def part_parameters(configs: SyntheticConfigs, part: str) -> int:
    """Parameters of model ``part`` of ``configs``, counted on the meta device (nothing is allocated)."""
    import torch

    if part not in PARTS:
        raise ValueError(f"unknown part '{part}', expected one of {', '.join(PARTS)}")
    components = build_synthetic(configs, 0, "meta", torch.bfloat16, "meta", parts=(part,))
    return sum(p.numel() for p in getattr(components, part).parameters())


def build_vae(configs: SyntheticConfigs, seed: int, device: Any, dtype: Any) -> Any:
    """The seeded ``AutoencoderKL`` of ``configs``."""
    import torch
    from diffusers import AutoencoderKL

    with constructing(device, dtype):
        torch.manual_seed(seed + 1)
        return AutoencoderKL(**configs.vae)


def build_text_encoders(
    configs: SyntheticConfigs, seed: int, device: Any, dtype: Any, parts: Iterable[str] = TEXT_ENCODERS
) -> tuple[Any, Any, Any, Any]:
    """The seeded CLIP and T5 encoders of ``configs`` with their local tokenizers: (clip, tokenizer, t5,
    tokenizer_2); an encoder not in ``parts`` is None."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **configs.clip,
    )
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
        is_encoder_decoder=False,
        **configs.t5,
    )
    text_encoder = text_encoder_2 = None
    with constructing(device, dtype):
        if "text_encoder" in parts:
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(clip_config)
        if "text_encoder_2" in parts:
            torch.manual_seed(seed + 3)
            text_encoder_2 = T5EncoderModel(t5_config)
    return text_encoder, tokenizer, text_encoder_2, tokenizer_2
