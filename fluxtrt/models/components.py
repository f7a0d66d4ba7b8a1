"""The loaded pieces of one FLUX.1-Kontext model, in diffusers/transformers classes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# FLUX.1's scheduler/scheduler_config.json: the shift parameters the sigma schedule reads.
FLUX_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

SUBFOLDERS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")
# The four models, each in the checkpoint subfolder of its name: what a subset load (``parts``) picks from.
PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


@dataclass
class FluxKontextComponents:
    """What a Kontext edit needs, held as the library classes diffusers' FluxKontextPipeline holds.

    A subset load (``load_components(..., parts=...)``) leaves the models it was not asked for None.

    Attributes:
        transformer: ``FluxTransformer2DModel``.
        vae: ``AutoencoderKL`` (16 latent channels, scaling/shift factors in its config), or the slim
            ``AutoencoderTiny`` (scaling 1, shift 0: it works in the transformer's latent space).
        text_encoder, tokenizer: CLIP text model (pooled output) and its tokenizer.
        text_encoder_2, tokenizer_2: T5 encoder and its tokenizer.
        scheduler_config: the checkpoint's scheduler config (shift parameters).
        source: where the weights came from (``tiny``, ``random-full`` or a directory).
        max_sequence_length: T5 tokens per prompt.
        vae_source: None for the model's own VAE; ``tiny`` or a directory when the slim autoencoder replaced it.
    """

    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any
    tokenizer_2: Any
    scheduler_config: dict = field(default_factory=lambda: dict(FLUX_SCHEDULER_CONFIG))
    source: str = ""
    max_sequence_length: int = 512
    vae_source: str | None = None

    def modules(self) -> dict[str, Any]:
        """The models loaded, by part name (``PARTS``)."""
        return {name: getattr(self, name) for name in PARTS if getattr(self, name) is not None}

    def to(self, device: Any, dtype: Any) -> FluxKontextComponents:
        """Move every module to ``device`` and ``dtype`` in place, in eval mode; returns self."""
        from diffusers.utils import logging as diffusers_logging

        # FLUX keeps no module in fp32, so diffusers' generic advice about casting with to() does not apply.
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            for module in self.modules().values():
                module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        finally:
            diffusers_logging.set_verbosity(level)
        return self

    def diffusers_pipeline(self) -> Any:
        """diffusers' own FluxKontextPipeline over these very modules: the oracle, and the way to save."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

        return FluxKontextPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**self.scheduler_config),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            transformer=self.transformer,
        )

    def save_pretrained(self, path: str | Path) -> None:
        """Write a diffusers-format checkpoint directory that ``--model PATH`` loads."""
        self.diffusers_pipeline().save_pretrained(str(path))
