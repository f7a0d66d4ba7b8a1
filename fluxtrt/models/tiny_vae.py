"""``--vae``: the slim autoencoder, diffusers' ``AutoencoderTiny`` with FLUX's 16 latent channels (TAEF1's shape).

TAEF1 (madebyollin/taef1) is TAESD's architecture with 16 latent channels: encoder blocks (1, 3, 3, 3) and decoder
blocks (3, 3, 3, 1) of 64 channels each, ReLU, nearest upsampling, 2.5M parameters (the FLUX VAE has 84M). It works
in the latent space the FLUX transformer sees: its encoder returns z = (latent - 0.1159) * 0.3611 of the FLUX VAE
directly and its decoder takes that z, so its config carries scaling 1.0 and shift 0.0 and the pipeline's
z = (latent - shift) * scaling becomes the identity (DESIGN 2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fluxtrt.errors import ModelLoadError, first_line

TINY_VAE = "tiny"
# diffusers' AutoencoderTiny arguments of TAEF1; the others are the class defaults, which are TAESD's.
TAEF1_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "encoder_block_out_channels": (64, 64, 64, 64),
    "decoder_block_out_channels": (64, 64, 64, 64),
    "num_encoder_blocks": (1, 3, 3, 3),
    "num_decoder_blocks": (3, 3, 3, 1),
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
}


def load_tiny_vae(source: str, device: Any, dtype: Any, seed: int = 0, latent_channels: int = 16) -> Any:
    """The slim autoencoder, in eval mode without gradients, on ``device`` in ``dtype``.

    Args:
        source: ``tiny`` (TAEF1's architecture with seeded random weights, for timing) or a diffusers-format
            ``AutoencoderTiny`` directory (config.json and weights, e.g. a download of madebyollin/taef1).
        device, dtype: where and in what precision.
        seed: initialisation seed of the random weights.
        latent_channels: the latent channels of the model it serves (16 for FLUX).

    Raises:
        ModelLoadError: the directory is missing, is not an AutoencoderTiny, has another latent channel count, or
            its weights cannot be read.
    """
    import torch
    from diffusers import AutoencoderTiny

    if source == TINY_VAE:
        torch.manual_seed(seed + 4)  # seeds +0..+3 are the transformer, VAE, CLIP and T5 (models.synthetic)
        vae = AutoencoderTiny(**{**TAEF1_CONFIG, "latent_channels": latent_channels})
    else:
        path = check_tiny_vae(source, latent_channels)
        try:
            vae = AutoencoderTiny.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelLoadError(
                f"--vae '{source}' could not be loaded: {first_line(exc)}; download the AutoencoderTiny again "
                "(e.g. `hf download madebyollin/taef1 --local-dir DIR`)"
            ) from None
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # no module of AutoencoderTiny needs fp32: the cast advice does not apply
    try:
        return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    finally:
        diffusers_logging.set_verbosity(level)


def check_tiny_vae(source: str, latent_channels: int) -> Path:
    """``source`` as a checked AutoencoderTiny directory with ``latent_channels`` channels.

    Raises:
        ModelLoadError: missing, not an AutoencoderTiny directory, or another latent channel count.
    """
    path = Path(source).expanduser()
    expected = f"expected {TINY_VAE} or a diffusers-format AutoencoderTiny directory (a download of madebyollin/taef1)"
    if not path.is_dir():
        raise ModelLoadError(f"--vae '{source}' is not a directory: {expected}")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"--vae '{source}' has no config.json: {expected}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"--vae '{source}': config.json is not valid JSON ({exc}); download it again") from None
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderTiny":
        name = config.get("_class_name") if isinstance(config, dict) else None
        raise ModelLoadError(f"--vae '{source}' is a {name or 'unnamed'} model, {expected}")
    channels = config.get("latent_channels", 4)  # AutoencoderTiny's default, TAESD's 4
    if channels != latent_channels:
        raise ModelLoadError(
            f"--vae '{source}' has {channels} latent channels, the model's latents have {latent_channels}: use the "
            "FLUX autoencoder (madebyollin/taef1), not TAESD/TAESDXL/TAESD3"
        )
    return path


def tiny_vae_fingerprint(source: str, seed: int = 0) -> str:
    """What identifies the slim autoencoder's weights cheaply (its config and the sizes of its files)."""
    if source == TINY_VAE:
        return f"taef1-random-seed{seed}"
    path = Path(source).expanduser()
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            rel = str(f.relative_to(path)).encode()
            digest.update(rel + (f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode()))
    return f"taef1-{digest.hexdigest()[:12]}"
