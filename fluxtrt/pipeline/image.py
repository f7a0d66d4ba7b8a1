"""Reference-image geometry and pixel conversion, as diffusers' FluxKontextPipeline does it."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fluxtrt.errors import FluxtrtError, InputError
from fluxtrt.io import atomic_write
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


def load_image(path: Path) -> tuple[Any, list[str]]:
    """Open ``path`` as the RGB PIL image a viewer displays, and the notices of what that conversion dropped.

    The EXIF orientation is applied (a phone photo stored sideways comes out upright), and every mode is brought to
    8-bit RGB as ``to_rgb`` says. Images over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5
    MP by default) are refused from their header, before their pixels are decoded: the edit uses about 1 MP of them
    anyway.

    Returns:
        The image, and one line per thing the conversion dropped (transparency, bit depth, a colour profile).

    Raises:
        InputError: missing file, not an image PIL can read, or more pixels than the limit.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                upright = ImageOps.exif_transpose(img)
                return to_rgb(upright, f"--image '{path}'")
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


# Modes of more than 8 bits a channel, and the range of values that maps to black..white.
_DEEP_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


# Quality of the lossy formats: high enough that the edit, not the encoder, is what one sees.
LOSSY_QUALITY = 95


def save_image(image: Any, path: Path, image_format: str, option: str = "--out") -> None:
    """Write ``image`` to ``path`` atomically in ``image_format`` (PNG, JPEG or WebP); ``option`` names the path in
    the error.

    Raises:
        FluxtrtError: the file cannot be written (the directory became read-only, the disk is full).
    """
    options = {} if image_format == "PNG" else {"quality": LOSSY_QUALITY}
    try:
        atomic_write(path, lambda tmp: image.save(tmp, format=image_format, **options))
    except OSError as exc:
        raise FluxtrtError(
            f"{option} '{path}' could not be written ({exc.strerror or exc}): pick a writable path with free space"
        ) from None


def to_rgb(img: Any, name: str = "the image") -> tuple[Any, list[str]]:
    """``img`` as 8-bit RGB showing what a viewer shows (``img`` itself if RGB already), and a notice (naming it
    ``name``) for what was dropped.

    - 1, L, P (opaque), RGB, YCbCr...: converted exactly, no notice.
    - LA, RGBA, PA, P with a transparent colour: composited on white (a notice when some pixel is not opaque).
    - CMYK: Pillow's conversion, R = (255 - C)(255 - K) / 255 and so on (a notice: no colour profile is applied).
    - I;16 (16-bit grayscale): scaled to 8 bits, v * 255 / 65535 rounded (a notice). I (32-bit integers) the same
      where its values lie in 0..65535; F (floats) scaled from 0..1. Values outside those ranges are stretched from
      the image's own minimum..maximum to 0..255 (a notice), never clipped.
    """
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img, []
    if mode in _DEEP_MODES:
        return _deep_to_rgb(img, name)
    if mode in ("RGBa", "La"):  # premultiplied alpha
        img = img.convert(mode.upper())
    if mode == "P" and "transparency" in img.info or mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("LA", "RGBA"):
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:  # every pixel opaque: nothing to drop
            return rgba.convert("RGB"), []
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notice = f"{name} has transparent pixels ({mode}): composited on white"
        return Image.alpha_composite(white, rgba).convert("RGB"), [notice]
    if mode == "CMYK":
        notice = (f"{name} is CMYK: converted to RGB without a colour profile, so its colours may differ from a "
                  "colour-managed viewer's; convert it to RGB first for exact colours")  # fmt: skip
        return img.convert("RGB"), [notice]
    return img.convert("RGB"), []


def _deep_to_rgb(img: Any, name: str) -> tuple[Any, list[str]]:
    """A 16-bit, 32-bit integer or float grayscale image scaled to 8-bit RGB (see ``to_rgb``)."""
    from PIL import Image

    mode, full = img.mode, _DEEP_MODES[img.mode]
    values = np.asarray(img, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if low >= 0 and high <= full:
        scaled = values * (255.0 / full)
        how = f"scaled from 0..{full:g} (v * 255 / {full:g})"
    else:
        scaled = (values - low) * (255.0 / (high - low) if high > low else 0.0)
        how = f"stretched from its values' range {low:g}..{high:g} (outside 0..{full:g})"
    pixels = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0).round().clip(0, 255).astype(np.uint8)
    depth = "16-bit" if mode.startswith("I;16") else "32-bit integer" if mode == "I" else "floating-point"
    notice = f"{name} is {depth} grayscale ({mode}): reduced to 8 bits, {how}"
    return Image.fromarray(pixels, "L").convert("RGB"), [notice]


def floored_resolution(width: int, height: int, multiple_of: int) -> Resolution:
    """``width`` x ``height`` with each side floored to a multiple of ``multiple_of`` (at least one)."""
    return Resolution(max(width // multiple_of, 1) * multiple_of, max(height // multiple_of, 1) * multiple_of)


def preferred_resolution(width: int, height: int, multiple_of: int) -> Resolution:
    """The preferred Kontext resolution closest in aspect ratio to a ``width`` x ``height`` image.

    The aspect ratio is taken after flooring both sides to ``multiple_of``, as diffusers does.
    """
    floored = floored_resolution(width, height, multiple_of)
    aspect = floored.width / floored.height
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
