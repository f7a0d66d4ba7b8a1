"""An edit request checked field by field before it may reach the queue: every refusal is a ``RequestError`` naming
the field, the value seen and what is expected. Nothing here reads a file: a request carries its image's bytes."""

from __future__ import annotations

import io
import math
import secrets
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fluxtrt.errors import InputError
from fluxtrt.pipeline.image import PREFERRED_KONTEXT_RESOLUTIONS, fit_to_area
from fluxtrt.specs.flux import Resolution

# The largest target area: that of the largest preferred Kontext resolution (about 1 MP).
MAX_TARGET_AREA = max(w * h for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
MIN_SIDE = 64
# Characters of a prompt looked at at all; its tokens are then bounded by the text encoder's length.
MAX_PROMPT_CHARS = 20_000
MAX_GUIDANCE = 30.0
MAX_SEED = 2**63 - 1
# Requests are checked on several threads; a fast tokenizer must not be entered by two at once.
_TOKENIZER_LOCK = threading.Lock()


class RequestError(InputError):
    """A request the server refuses: HTTP ``status``, the OpenAI error ``param`` (the field) and ``code``."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass(frozen=True)
class EditRequest:
    """One validated request: ``n`` edits of ``image`` as ``prompt`` says, image i with seed ``seed + i``.

    ``size`` None keeps the reference's resolution; ``max_area`` is the area an explicit size is fitted to (its own,
    so the output has exactly the asked size). ``lora`` names one of the server's LoRAs, merged at ``lora_scale``."""

    image: Any
    prompt: str
    n: int = 1
    size: Resolution | None = None
    steps: int = 14
    seed: int = 0
    guidance: float = 2.5
    lora: str | None = None
    lora_scale: float = 1.0

    @property
    def loras(self) -> tuple[tuple[str, float], ...]:
        """The LoRA selection its batch runs with (``fluxtrt.serve.loras.Selection``)."""
        return ((self.lora, self.lora_scale),) if self.lora is not None else ()

    @property
    def max_area(self) -> int:
        return self.size.width * self.size.height if self.size is not None else MAX_TARGET_AREA

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.n)]


def decode_image(data: bytes, max_pixels: int, param: str = "image") -> Any:
    """The uploaded bytes as an RGB PIL image; its size is checked from the header, before any pixel is decoded.

    Raises:
        RequestError: empty, not an image, more than ``max_pixels`` pixels, or truncated/corrupt.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    from fluxtrt.pipeline.image import to_rgb

    if not data:
        raise RequestError(f"{param} is empty (0 bytes): upload a PNG, JPEG or WebP file", param, "invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            pixels = img.width * img.height
            if pixels > max_pixels:
                raise RequestError(
                    f"{param} is {img.width}x{img.height} ({pixels:,} pixels), over this server's limit of "
                    f"{max_pixels:,}: downscale it (the edit works at about 1 MP)",
                    param,
                    "image_too_large",
                )
            img.load()
            # As `infer` reads a file: upright from its EXIF orientation, every mode as the RGB picture it shows.
            return to_rgb(ImageOps.exif_transpose(img), param)[0]
    except RequestError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise RequestError(
            f"{param} has more pixels than this server decodes (limit {max_pixels:,}): downscale it",
            param,
            "image_too_large",
        ) from None
    except UnidentifiedImageError:
        raise RequestError(f"{param} is not an image ({len(data):,} bytes): upload a PNG, JPEG or WebP file", param,
                           "invalid_image") from None  # fmt: skip
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt pixel data
        raise RequestError(f"{param} could not be decoded ({exc}): upload a complete PNG, JPEG or WebP file", param,
                           "invalid_image") from None  # fmt: skip


def parse_size(text: str | None, multiple_of: int = 16) -> Resolution | None:
    """``auto`` (None) or ``WIDTHxHEIGHT`` with sides multiples of ``multiple_of``, at least ``MIN_SIDE``, and an area
    at most ``MAX_TARGET_AREA``.

    Raises:
        RequestError: anything else.
    """
    if text is None or text.strip().lower() in ("", "auto"):
        return None
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise RequestError(f"size is '{text}', expected auto or WIDTHxHEIGHT such as 1024x1024", "size")
    width, height = int(parts[0]), int(parts[1])
    if min(width, height) < MIN_SIDE or width % multiple_of or height % multiple_of:
        raise RequestError(f"size is '{text}', expected sides of at least {MIN_SIDE} px, each a multiple of "
                           f"{multiple_of} (e.g. 1024x1024)", "size")  # fmt: skip
    if width * height > MAX_TARGET_AREA:
        raise RequestError(f"size is '{text}' ({width * height:,} pixels), over the model's {MAX_TARGET_AREA:,}: pick "
                           "a smaller size, e.g. 1024x1024", "size")  # fmt: skip
    return Resolution(width, height)


def parse_int(name: str, text: str | None, default: int, lowest: int, highest: int) -> int:
    """An integer form field between ``lowest`` and ``highest``; ``default`` when absent."""
    if text is None or str(text).strip() == "":
        return default
    try:
        value = int(str(text).strip())
    except ValueError:
        raise RequestError(f"{name} is '{text}', expected an integer from {lowest} to {highest}", name) from None
    if not lowest <= value <= highest:
        raise RequestError(f"{name} is {value}, expected an integer from {lowest} to {highest}", name)
    return value


def parse_guidance(text: str | None, default: float) -> float:
    if text is None or str(text).strip() == "":
        return default
    try:
        value = float(str(text).strip())
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= MAX_GUIDANCE:  # also refuses nan
        raise RequestError(f"guidance is '{text}', expected a number from 0 to {MAX_GUIDANCE:g}", "guidance")
    return value


def check_prompt(prompt: str | None, tokenizer: Any, max_tokens: int) -> str:
    """The prompt, refused when empty or longer than the text encoder takes (``max_tokens`` of ``tokenizer``).

    Raises:
        RequestError: missing, blank, or too long.
    """
    if prompt is None or not prompt.strip():
        raise RequestError("prompt is empty: say what to change, e.g. 'make the sky red'", "prompt", "empty_prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt has {len(prompt):,} characters, over {MAX_PROMPT_CHARS:,}: shorten it", "prompt",
                           "prompt_too_long")  # fmt: skip
    if tokenizer is not None:
        with _TOKENIZER_LOCK:
            tokens = len(tokenizer(prompt, padding=False, truncation=False, verbose=False).input_ids)
        if tokens > max_tokens:
            raise RequestError(f"prompt has {tokens} tokens, over the text encoder's {max_tokens}: shorten it",
                               "prompt", "prompt_too_long")  # fmt: skip
    return prompt


def parse_lora(name: str | None, scale: str | None, loras: Mapping[str, float]) -> tuple[str | None, float]:
    """(the LoRA a request names, its scale): ``scale`` or the LoRA's default from ``loras`` (name -> scale).

    Raises:
        RequestError: an unknown name, a scale that is not a number in range, or a scale without a LoRA.
    """
    from fluxtrt.serve.loras import parse_scale

    given = scale is not None and str(scale).strip() != ""
    if name is None or not name.strip():
        if given:
            raise RequestError(f"lora_scale is '{scale}' but no lora is named: pass lora=NAME too", "lora_scale")
        return None, 1.0
    name = name.strip()
    if name not in loras:
        known = ", ".join(loras) or "none: the server was started without --lora"
        raise RequestError(f"lora is '{name}', which this server has not loaded; its LoRAs: {known}", "lora",
                           "unknown_lora")  # fmt: skip
    try:
        return name, parse_scale(scale) if given else loras[name]
    except InputError as exc:
        raise RequestError(str(exc), "lora_scale") from None


def parse_request(fields: dict[str, Any], image_bytes: bytes | None, *, tokenizer: Any, max_tokens: int,
                  max_batch: int, max_steps: int, default_steps: int, max_pixels: int,
                  keep_reference_size: bool, loras: Mapping[str, float] | None = None) -> EditRequest:  # fmt: skip
    """An ``EditRequest`` from the form fields (strings) and the image's bytes; ``loras``: the server's LoRAs (name
    -> default scale).

    Raises:
        RequestError: the first field that is missing or out of its bounds.
    """
    if image_bytes is None:
        raise RequestError("no image was uploaded: send the image to edit as the multipart field 'image'", "image",
                           "missing_image")  # fmt: skip
    fmt = fields.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise RequestError(f"response_format is '{fmt}', expected b64_json (this server keeps no image files)",
                           "response_format")  # fmt: skip
    if fields.get("mask") is not None:
        raise RequestError("mask is not supported: FLUX.1-Kontext edits the whole image as the prompt says", "mask")
    n = parse_int("n", fields.get("n"), 1, 1, max_batch)
    size = parse_size(fields.get("size"))
    steps = parse_int("steps", fields.get("steps"), default_steps, 1, max_steps)
    seed = parse_int("seed", fields.get("seed"), secrets.randbelow(2**31), 0, MAX_SEED)
    guidance = parse_guidance(fields.get("guidance"), 2.5)
    lora, lora_scale = parse_lora(fields.get("lora"), fields.get("lora_scale"), loras or {})
    prompt = check_prompt(fields.get("prompt"), tokenizer, max_tokens)
    image = decode_image(image_bytes, max_pixels)
    if keep_reference_size and image.width * image.height > MAX_TARGET_AREA:
        from PIL import Image

        fitted = fit_to_area(image.width, image.height, MAX_TARGET_AREA, 16)
        image = image.resize((fitted.width, fitted.height), Image.Resampling.LANCZOS)
    return EditRequest(image, prompt, n, size, steps, seed, guidance, lora, lora_scale)
