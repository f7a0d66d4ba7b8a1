"""The five FLUX.1-Kontext component specs (DESIGN 1), parameterised by the model's dimensions, and the two parts
the transformer splits into for the first-block cache (DESIGN 6).

Symbols: ``B`` batch; ``H``/``W`` the component's image size in pixels; ``h``/``w`` its latent size (pixels / 8);
``S`` transformer tokens = target tokens + reference tokens (Kontext appends the packed reference latents).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fluxtrt.specs.component import ComponentSpec, TensorSpec, Tolerance

COMPONENTS = ("clip", "t5", "vae_encoder", "transformer", "vae_decoder")
# The transformer as two engines, for the first-block cache: embeddings + the first double block, and the rest.
TRANSFORMER_PARTS = ("transformer_first", "transformer_rest")
# Everything ``fluxtrt build`` can build, and the components that are (part of) the transformer.
BUILDABLE = (*COMPONENTS, *TRANSFORMER_PARTS)
TRANSFORMERS = ("transformer", *TRANSFORMER_PARTS)

# fp32 runners of one graph agree to float rounding; bf16 runners to a few bf16 ulps of accumulated error.
_TOLERANCE = {
    "clip": {"fp32": Tolerance(1e-4, 1e-4), "bf16": Tolerance(5e-2, 5e-2)},
    "t5": {"fp32": Tolerance(1e-4, 1e-4), "bf16": Tolerance(5e-2, 5e-2)},
    "vae_encoder": {"fp32": Tolerance(1e-4, 1e-4), "bf16": Tolerance(5e-2, 5e-2)},
    "transformer": {"fp32": Tolerance(1e-4, 1e-4), "bf16": Tolerance(5e-2, 5e-2)},
    "transformer_first": {"fp32": Tolerance(1e-4, 1e-4), "bf16": Tolerance(5e-2, 5e-2)},
    "transformer_rest": {"fp32": Tolerance(1e-4, 1e-4), "bf16": Tolerance(5e-2, 5e-2)},
    "vae_decoder": {"fp32": Tolerance(1e-4, 1e-4), "bf16": Tolerance(5e-2, 5e-2)},
}


@dataclass(frozen=True)
class Resolution:
    """An image size in pixels (width x height, as users write it)."""

    width: int
    height: int

    @classmethod
    def parse(cls, text: str, option: str = "resolution") -> Resolution:
        """Parse ``"1024x768"`` (width x height); ``option`` names the value in the error.

        Raises:
            InputError: not WIDTHxHEIGHT with positive integers.
        """
        from fluxtrt.errors import InputError

        try:
            w, h = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise InputError(f"{option} is '{text}', expected WIDTHxHEIGHT such as 1024x1024") from None
        if w <= 0 or h <= 0:
            raise InputError(f"{option} is '{text}', expected positive sides such as 1024x1024")
        return cls(w, h)

    def within(self, lo: Resolution, hi: Resolution) -> bool:
        """Whether both sides lie in [lo, hi]."""
        return lo.width <= self.width <= hi.width and lo.height <= self.height <= hi.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class FluxDims:
    """The sizes a checkpoint fixes; read from the loaded configs, never assumed.

    Attributes:
        clip_vocab, clip_len, clip_dim: CLIP vocabulary, token count (77) and pooled width (768 for CLIP-L).
        t5_vocab, t5_len, t5_dim: T5 vocabulary, token count (512) and hidden width (4096 for T5-XXL).
        latent_channels: VAE latent channels (16).
        vae_scale: pixels per latent (8).
        packed_channels: transformer input width (latent_channels * 4 = 64, 2x2 patches).
        transformer_dim: the transformer's hidden width (heads x head dim: 3072); what its two parts hand over.
            Manifests written before it was recorded read as FLUX's 3072 (they hold no parts).
    """

    clip_vocab: int
    clip_len: int
    clip_dim: int
    t5_vocab: int
    t5_len: int
    t5_dim: int
    latent_channels: int
    vae_scale: int
    packed_channels: int
    transformer_dim: int = 3072

    @property
    def multiple_of(self) -> int:
        """Image sides must be multiples of this: one 2x2 patch of latents."""
        return self.vae_scale * 2

    def tokens(self, res: Resolution) -> int:
        """Packed latent tokens for an image of ``res`` (a multiple of ``multiple_of``)."""
        return image_tokens(res, self.multiple_of)


def vae_scale_of(block_out_channels: Any) -> int:
    """Pixels per latent of a FLUX VAE with these blocks (its config's ``block_out_channels``): each block but the
    last halves the sides."""
    return 2 ** (len(block_out_channels) - 1)


def image_tokens(res: Resolution, multiple_of: int) -> int:
    """Packed latent tokens for an image of ``res`` whose tokens are ``multiple_of`` pixels a side."""
    return (res.height // multiple_of) * (res.width // multiple_of)


# FLUX.1-Kontext-dev: CLIP-L (49408 tokens, 77, 768 pooled), T5-XXL (32128 tokens, 512, 4096), 16-channel VAE at
# 8x, 64 packed channels. What the full-size (random-full) model has; loaded checkpoints are read, not assumed.
FLUX_KONTEXT_DIMS = FluxDims(49408, 77, 768, 32128, 512, 4096, 16, 8, 64, 3072)


def component_dims(name: str, dims: FluxDims, batch: int, target: Resolution, reference: Resolution) -> dict[str, int]:
    """Symbol values of component ``name`` for one edit geometry.

    The VAE encoder sees the reference image, the VAE decoder the target, the transformer (and its parts) both.
    """
    if name == "vae_encoder" or name == "vae_decoder":
        res = reference if name == "vae_encoder" else target
        return {
            "B": batch,
            "H": res.height,
            "W": res.width,
            "h": res.height // dims.vae_scale,
            "w": res.width // dims.vae_scale,
        }
    if name in TRANSFORMERS:
        return {"B": batch, "S": dims.tokens(target) + dims.tokens(reference)}
    return {"B": batch}


def dim_values(dims: FluxDims, batch: int, target: Resolution, reference: Resolution) -> dict[str, dict[str, int]]:
    """``component_dims`` for everything buildable: the five components and the transformer's parts."""
    return {name: component_dims(name, dims, batch, target, reference) for name in BUILDABLE}


def profile_shapes(
    spec: ComponentSpec,
    dims: FluxDims,
    batch: tuple[int, int, int],
    resolutions: tuple[Resolution, Resolution, Resolution],
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Min/opt/max input shapes of ``spec`` for a batch range and a (min, opt, max) resolution range.

    Target and reference take the same resolution at each point, which bounds every edit whose two images lie in
    the range.
    """
    points = [component_dims(spec.name, dims, b, r, r) for b, r in zip(batch, resolutions, strict=True)]
    return {t.name: tuple(t.concrete(p) for p in points) for t in spec.inputs}  # type: ignore[misc]


def component_specs(dims: FluxDims) -> dict[str, ComponentSpec]:
    """The five specs for a model of ``dims``, and the specs of the transformer's two parts."""
    c, p = dims.latent_channels, dims.packed_channels
    transformer_inputs = (
        TensorSpec("hidden_states", ("B", "S", p), "compute"),
        TensorSpec("encoder_hidden_states", ("B", dims.t5_len, dims.t5_dim), "compute"),
        TensorSpec("pooled_projections", ("B", dims.clip_dim), "compute"),
        TensorSpec("timestep", ("B",), "compute", "unit"),
        TensorSpec("guidance", ("B",), "float32", "const", value=2.5),
        TensorSpec("img_ids", ("S", 3), "float32", "grid"),
        TensorSpec("txt_ids", (dims.t5_len, 3), "float32", "const", value=0.0),
    )
    specs = [
        ComponentSpec(
            "clip",
            (TensorSpec("input_ids", ("B", dims.clip_len), "int64", "ids", vocab=dims.clip_vocab),),
            (TensorSpec("pooled_embeds", ("B", dims.clip_dim), "compute"),),
            _TOLERANCE["clip"],
        ),
        ComponentSpec(
            "t5",
            (TensorSpec("input_ids", ("B", dims.t5_len), "int64", "ids", vocab=dims.t5_vocab),),
            (TensorSpec("text_embeds", ("B", dims.t5_len, dims.t5_dim), "compute"),),
            _TOLERANCE["t5"],
        ),
        ComponentSpec(
            "vae_encoder",
            (TensorSpec("image", ("B", 3, "H", "W"), "compute", "signed"),),
            (TensorSpec("latent", ("B", c, "h", "w"), "compute"),),
            _TOLERANCE["vae_encoder"],
        ),
        ComponentSpec(
            "transformer",
            transformer_inputs,
            (TensorSpec("noise_pred", ("B", "S", p), "compute"),),
            _TOLERANCE["transformer"],
        ),
        *transformer_part_specs(transformer_inputs, dims.transformer_dim).values(),
        ComponentSpec(
            "vae_decoder",
            (TensorSpec("latent", ("B", c, "h", "w"), "compute"),),
            (TensorSpec("image", ("B", 3, "H", "W"), "compute"),),
            _TOLERANCE["vae_decoder"],
        ),
    ]
    return {s.name: s for s in specs}


def transformer_part_specs(transformer_inputs: tuple[TensorSpec, ...], dim: int) -> dict[str, ComponentSpec]:
    """The specs of the transformer's two parts, from the transformer's inputs and its hidden width ``dim``
    (modules: ``fluxtrt.backends.torch_modules.TransformerFirstModule`` and ``TransformerRestModule``).

    transformer_first: the transformer's inputs and the rest-residual cached from the last computed step (zeros
    before one) -> the image and text tokens after the first double block, temb, the first block's residual, and
    ``cached_pred``: norm_out and proj_out of (first block's output + cached rest-residual), the prediction of a
    step that skips. transformer_rest: the first block's outputs, temb and the ids -> noise_pred and the residual of
    the remaining blocks (their output minus their input), which the cache keeps.
    """
    d, p, text = dim, transformer_inputs[0].shape[-1], transformer_inputs[1].shape[1]
    hidden = TensorSpec("hidden", ("B", "S", d), "compute")
    encoder_hidden = TensorSpec("encoder_hidden", ("B", text, d), "compute")
    temb = TensorSpec("temb", ("B", d), "compute")
    ids = transformer_inputs[-2:]  # img_ids, txt_ids: the rest recomputes the rotary embedding from them
    first = ComponentSpec(
        "transformer_first",
        (*transformer_inputs, TensorSpec("rest_residual", ("B", "S", d), "compute")),
        (
            hidden,
            encoder_hidden,
            temb,
            TensorSpec("first_residual", ("B", "S", d), "compute"),
            TensorSpec("cached_pred", ("B", "S", p), "compute"),
        ),  # fmt: skip
        _TOLERANCE["transformer_first"],
    )
    rest = ComponentSpec(
        "transformer_rest",
        (hidden, encoder_hidden, temb, *ids),
        (TensorSpec("noise_pred", ("B", "S", p), "compute"), TensorSpec("rest_residual", ("B", "S", d), "compute")),
        _TOLERANCE["transformer_rest"],
    )
    return {first.name: first, rest.name: rest}


def dims_from_components(components: Any) -> FluxDims:
    """Read ``FluxDims`` off loaded diffusers/transformers components (see ``fluxtrt.models``)."""
    vae = components.vae.config
    return FluxDims(
        clip_vocab=components.text_encoder.config.vocab_size,
        clip_len=components.tokenizer.model_max_length,
        clip_dim=components.text_encoder.config.hidden_size,
        t5_vocab=components.text_encoder_2.config.vocab_size,
        t5_len=components.max_sequence_length,
        t5_dim=components.text_encoder_2.config.d_model,
        latent_channels=vae.latent_channels,
        vae_scale=vae_scale_of(vae.block_out_channels),
        packed_channels=components.transformer.config.in_channels,
        transformer_dim=components.transformer.config.num_attention_heads
        * components.transformer.config.attention_head_dim,
    )
