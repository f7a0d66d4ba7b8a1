"""Each component (and each part of the split transformer) as an ``nn.Module`` whose forward takes the spec's inputs
in order and returns its outputs.

These are what the torch runner calls and what ONNX export traces, so both see the same graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class ClipModule(nn.Module):
    """CLIP text encoder -> pooled embedding. input_ids [B, 77] -> [B, 768]."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, output_hidden_states=False).pooler_output


class T5Module(nn.Module):
    """T5 encoder -> hidden states. input_ids [B, 512] -> [B, 512, 4096]."""

    def __init__(self, text_encoder_2: nn.Module):
        super().__init__()
        self.text_encoder_2 = text_encoder_2

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder_2(input_ids, output_hidden_states=False)[0]


class VaeEncoderModule(nn.Module):
    """VAE encoder -> the distribution's mode (not a sample). image [B, 3, H, W] -> latent [B, 16, H/8, W/8].

    The slim ``AutoencoderTiny`` is deterministic: its encoding is the latent itself (in the transformer's space).
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(image)
        return out.latents if hasattr(out, "latents") else out.latent_dist.mode()


class VaeDecoderModule(nn.Module):
    """VAE decoder. latent [B, 16, h, w] (already z / scaling + shift) -> image [B, 3, 8h, 8w], unclamped."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class TransformerModule(nn.Module):
    """FLUX transformer, one denoising call. Returns noise_pred [B, S, 64] for hidden_states [B, S, 64]."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, S_target + S_ref, 64]
        encoder_hidden_states: torch.Tensor,  # [B, 512, 4096]
        pooled_projections: torch.Tensor,  # [B, 768]
        timestep: torch.Tensor,  # [B], sigma in [0, 1]
        guidance: torch.Tensor,  # [B] fp32
        img_ids: torch.Tensor,  # [S, 3] fp32
        txt_ids: torch.Tensor,  # [512, 3] fp32
    ) -> torch.Tensor:
        return self.transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            guidance=guidance,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]


def _blocks(blocks, hidden, context, temb, rope):
    """Run FLUX transformer blocks in order; returns (text tokens, image tokens)."""
    for block in blocks:
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rope)
    return context, hidden


def _rope(transformer: nn.Module, img_ids: torch.Tensor, txt_ids: torch.Tensor):
    return transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))  # cos, sin: [512 + S, head_dim]


class TransformerFirstModule(nn.Module):
    """The first part of the split transformer (the first-block cache's engine, DESIGN 6): the embeddings and the
    first double block, with the prediction a skipped step returns.

    diffusers' FluxTransformer2DModel.forward written out (without ControlNet and IP-Adapter inputs), calling the
    model's own submodules. The inputs are the transformer's plus ``rest_residual`` [B, S, D] (the residual of the
    remaining blocks cached from the last computed step); the outputs are the spec's: hidden [B, S, D] and
    encoder_hidden [B, 512, D] after the first block, temb [B, D], first_residual [B, S, D] (the first block's
    output minus its input) and cached_pred [B, S, 64] = proj_out(norm_out(hidden + rest_residual, temb)).
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance, img_ids, txt_ids,
                rest_residual):  # fmt: skip
        tr = self.transformer
        embedded = tr.x_embedder(hidden_states)  # [B, S, D]
        t = timestep.to(embedded.dtype) * 1000
        if tr.config.guidance_embeds:
            temb = tr.time_text_embed(t, guidance.to(embedded.dtype) * 1000, pooled_projections)  # [B, D]
        else:
            temb = tr.time_text_embed(t, pooled_projections)
        context = tr.context_embedder(encoder_hidden_states)  # [B, 512, D]
        rope = _rope(tr, img_ids, txt_ids)
        context, hidden = _blocks(tr.transformer_blocks[:1], embedded, context, temb, rope)
        cached_pred = tr.proj_out(tr.norm_out(hidden + rest_residual, temb))  # [B, S, 64]
        return hidden, context, temb, hidden - embedded, cached_pred


class TransformerRestModule(nn.Module):
    """The second part of the split transformer: the double blocks after the first, the single blocks, norm_out and
    proj_out. hidden [B, S, D], encoder_hidden [B, 512, D], temb [B, D], img_ids, txt_ids -> noise_pred [B, S, 64]
    and rest_residual [B, S, D] (the blocks' output minus their input, what the first-block cache keeps)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden, encoder_hidden, temb, img_ids, txt_ids):
        tr = self.transformer
        rope = _rope(tr, img_ids, txt_ids)
        context, out = _blocks(tr.transformer_blocks[1:], hidden, encoder_hidden, temb, rope)
        _, out = _blocks(tr.single_transformer_blocks, out, context, temb, rope)
        return tr.proj_out(tr.norm_out(out, temb)), out - hidden


def part_owns_linear(part: str, linear: str) -> bool:
    """Whether the transformer's linear ``linear`` (its name in the diffusers model) is computed by ``part``
    (``transformer``, ``transformer_first`` or ``transformer_rest``), so calibrated scales go to the part that runs
    the layer. The embedders, norm_out and proj_out count as the first part's (they stay unquantized anyway)."""
    if part == "transformer":
        return True
    in_rest = linear.startswith("single_transformer_blocks.") or (
        linear.startswith("transformer_blocks.") and not linear.startswith("transformer_blocks.0.")
    )
    return in_rest == (part == "transformer_rest")


@contextlib.contextmanager
def fused_qkv(transformer: nn.Module) -> Iterator[int]:
    """diffusers' ``fuse_qkv_projections`` of a FLUX transformer for the duration (one GEMM instead of three on the
    same input, ``to_qkv`` and ``to_added_qkv``), undone on exit unless the model was fused already. The stages call
    the same diffusers methods directly, since their fusion outlives one call.

    Yields:
        How many attention modules are fused.
    """
    from diffusers.models.attention import AttentionModuleMixin

    attentions = [m for m in transformer.modules() if isinstance(m, AttentionModuleMixin) and m._supports_qkv_fusion]
    already = all(getattr(m, "fused_projections", False) for m in attentions)
    if not already:
        transformer.fuse_qkv_projections()
    try:
        yield len(attentions)
    finally:
        if not already:
            transformer.unfuse_qkv_projections()


def component_module(name: str, components) -> nn.Module:
    """The module of component ``name`` over loaded ``FluxKontextComponents``, in eval mode."""
    modules = {
        "clip": lambda: ClipModule(components.text_encoder),
        "t5": lambda: T5Module(components.text_encoder_2),
        "vae_encoder": lambda: VaeEncoderModule(components.vae),
        "vae_decoder": lambda: VaeDecoderModule(components.vae),
        "transformer": lambda: TransformerModule(components.transformer),
        "transformer_first": lambda: TransformerFirstModule(components.transformer),
        "transformer_rest": lambda: TransformerRestModule(components.transformer),
    }
    if name not in modules:
        raise ValueError(f"unknown component '{name}', expected one of {', '.join(modules)}")
    return modules[name]().eval()
