"""Reference-image geometry and pixel conversion, as diffusers' FluxKontextPipeline does it."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fluxtrt.errors import InputError
from fluxtrt.specs.flux import Resolution

# The ~1 MP (width, height) sizes FLUX.1-Kontext was trained at, as listed by diffusers.
PREFERRED_KONTEXT_RESOLUTIONS = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
]


# A reference smaller than this on a side is upscaled many times over to its ~1 MP size: the edit gets a notice.
MIN_REFERENCE_SIDE = 64


def load_image(path: Path) -> Any:
    """Open ``path`` as an RGB PIL image.

    Images over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 MP by default) are refused
    from their header, before their pixels are decoded: the edit uses about 1 MP of them anyway.

    Raises:
        InputError: missing file, not an image PIL can read, or more pixels than the limit.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        # Pillow's message: "Image size (N pixels) exceeds limit of M pixels, ..."
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(pixels.group(1)):,} pixels" if pixels else "more pixels than that"
        raise InputError(
            f"--image '{path}' has {count}, over the limit of {Image.MAX_IMAGE_PIXELS:,} (Pillow's decompression-bomb "
            "guard): downscale it first, e.g. to 1024x1024 (the edit works at about 1 MP)"
        ) from None
    except FileNotFoundError:
        raise InputError(f"--image '{path}' does not exist: pass a PNG or JPEG path") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"--image '{path}' is not a readable image ({exc}): pass a PNG or JPEG file") from None


def preferred_resolution(width: int, height: int, multiple_of: int) -> Resolution:
    """The preferred Kontext resolution closest in aspect ratio to a ``width`` x ``height`` image.

    The aspect ratio is taken after flooring both sides to ``multiple_of``, as diffusers does.
    """
    w, h = max(width // multiple_of, 1) * multiple_of, max(height // multiple_of, 1) * multiple_of
    aspect = w / h
    _, pw, ph = min((abs(aspect - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
    return Resolution(pw // multiple_of * multiple_of, ph // multiple_of * multiple_of)


def fit_to_area(width: int, height: int, max_area: int, multiple_of: int) -> Resolution:
    """An explicit target size scaled to ``max_area`` at the same aspect ratio, floored to ``multiple_of``.

    Raises:
        InputError: the fitted size has a zero side (an extreme aspect ratio).
    """
    aspect = width / height
    w = round((max_area * aspect) ** 0.5) // multiple_of * multiple_of
    h = round((max_area / aspect) ** 0.5) // multiple_of * multiple_of
    if w <= 0 or h <= 0:
        raise InputError(
            f"--width {width} --height {height} fitted to {max_area} pixels gives {w}x{h}: "
            f"use an aspect ratio whose sides are both at least {multiple_of} pixels at that area"
        )
    return Resolution(w, h)


def images_to_tensor(images: list[Any], res: Resolution) -> Any:
    """Lanczos-resize PIL images to ``res`` and scale to [-1, 1]: float32 [B, 3, H, W].

    The tensor is a channels-last view of the [B, H, W, 3] pixels, exactly as diffusers' VaeImageProcessor makes
    it: the VAE's convolutions pick their kernels by memory layout, so the same layout gives the same latents.
    """
    import torch
    from PIL import Image

    resized = [im.resize((res.width, res.height), resample=Image.Resampling.LANCZOS) for im in images]
    array = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in resized])  # [B, H, W, 3]
    return torch.from_numpy(array.transpose(0, 3, 1, 2)) * 2.0 - 1.0


def tensor_to_images(images: Any) -> list[Any]:
    """[B, 3, H, W] in about [-1, 1] -> clamped, rounded uint8 PIL images."""
    import torch
    from PIL import Image

    pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to("cpu", dtype=torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
