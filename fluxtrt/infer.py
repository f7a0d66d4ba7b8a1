"""``fluxtrt infer``: one image edit from a frozen ``InferConfig``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fluxtrt.config import InferConfig
from fluxtrt.environment import check_device
from fluxtrt.errors import FluxtrtError
from fluxtrt.io import atomic_write
from fluxtrt.pipeline.kontext import EditResult


@dataclass
class InferReport:
    """An edit written to disk: the pipeline's result plus model load time, and the first-block cache's counts
    (``fluxtrt.pipeline.first_block_cache.CacheStats``) and threshold when the engines run it."""

    result: EditResult
    load_s: float
    model: str
    device: str
    dtype: str
    cache: Any = None
    fbc_threshold: float | None = None


def run_infer(config: InferConfig, on_step: Callable[[int, int], None] | None = None) -> InferReport:
    """Load the model, edit the image, write it atomically (PNG, JPEG or WebP, as ``config.out_format`` says).

    Args:
        config: the validated edit request.
        on_step: progress callback ``(done, total)``.

    Returns:
        The report; ``config.out`` holds the edited image.

    Raises:
        FluxtrtError: bad input, an unloadable model, an unavailable device, a non-finite edit, or an output that
            cannot be written. Nothing is written in that case.
    """
    from fluxtrt.models import load_components
    from fluxtrt.pipeline.image import load_image
    from fluxtrt.pipeline.kontext import KontextPipeline

    device = config.resolved_device
    check_device(device)
    image = load_image(config.image)
    t0 = time.perf_counter()
    if config.engines is not None:
        from fluxtrt.engines.load import load_engine_pipeline

        pipeline = load_engine_pipeline(config.engines, device, config.fbc_threshold, config.fbc is not None)
        source = f"engines {config.engines}"
    else:
        components = load_components(config.model, device, config.resolved_dtype, seed=0)
        pipeline = KontextPipeline.from_components(components)
        source = config.model
    load_s = time.perf_counter() - t0
    with pipeline:
        result = pipeline.edit(
            image,
            config.prompt,
            sampler=config.sampler,
            seed=config.seed,
            guidance=config.guidance,
            height=config.height,
            width=config.width,
            on_step=on_step,
        )
    save_image(result.images[0], config)
    dtype = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}.get(str(pipeline.dtype), str(pipeline.dtype))
    stats = getattr(pipeline.runners["transformer"], "stats", None)  # engines built with --first-block-cache
    cache = stats() if stats is not None else None
    threshold = pipeline.runners["transformer"].threshold if cache is not None else None
    return InferReport(result, load_s, source, device, dtype, cache, threshold)


# Quality of the lossy formats: high enough that the edit, not the encoder, is what one sees.
LOSSY_QUALITY = 95


def save_image(image: Any, config: InferConfig) -> None:
    """Write ``image`` to ``config.out`` atomically in ``config.out_format``.

    Raises:
        FluxtrtError: the file cannot be written (the directory became read-only, the disk is full).
    """
    options = {} if config.out_format == "PNG" else {"quality": LOSSY_QUALITY}
    try:
        atomic_write(config.out, lambda tmp: image.save(tmp, format=config.out_format, **options))
    except OSError as exc:
        raise FluxtrtError(
            f"--out '{config.out}' could not be written ({exc.strerror or exc}): pick a writable path with free space"
        ) from None
