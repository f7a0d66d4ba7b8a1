"""``fluxtrt infer``: one image edit from a frozen ``InferConfig``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fluxtrt.config import InferConfig
from fluxtrt.engines.load import EngineSource, engines_device
from fluxtrt.environment import check_device
from fluxtrt.lora.files import lora_label, read_loras
from fluxtrt.models.components import FluxKontextComponents
from fluxtrt.models.loading import vae_scale
from fluxtrt.models.options import ModelOptions
from fluxtrt.parallel.context import init_world
from fluxtrt.pipeline.first_block_cache import CacheStats
from fluxtrt.pipeline.image import load_image, save_image
from fluxtrt.pipeline.kontext import DEFAULT_MAX_AREA, EditResult
from fluxtrt.pipeline.model import ModelSource
from fluxtrt.pipeline.sizes import check_split, wanted_geometry


@dataclass
class InferReport:
    """An edit written to disk: the pipeline's result plus model load time, and the first-block cache's counts and
    threshold when the engines run it."""

    result: EditResult
    load_s: float
    model: str
    device: str
    dtype: str
    cache: CacheStats | None = None
    fbc_threshold: float | None = None


def run_infer(config: InferConfig, on_step: Callable[[int, int], None] | None = None) -> InferReport:
    """Load the model, edit the image, write it atomically (PNG, JPEG or WebP, as ``config.out_format`` says).

    With ``config.gpus`` > 1 this runs in each of the processes ``fluxtrt.parallel.launch`` started: the
    transformer's sequence is split over them, and rank 0 alone writes the image.

    Args:
        config: the validated edit request.
        on_step: progress callback ``(done, total)``.

    Returns:
        The report; ``config.out`` holds the edited image.

    Raises:
        FluxtrtError: bad input, an unloadable model, an unavailable device, a non-finite edit, a sequence that does
            not split over ``config.gpus``, or an output that cannot be written. Nothing is written in that case.
    """
    source = pipeline_source(config, run_device(config))
    image, image_notices = load_image(config.image)
    loras = read_loras(config.loras)
    check_device(source.device)
    world = init_world(config.gpus, source.device) if config.gpus > 1 else None
    try:
        t0 = time.perf_counter()
        pipeline = source.load(loras, prepare=None if world is None else world.prepare)
        load_s = time.perf_counter() - t0
        with pipeline:
            pipeline.sequence_split = 1 if world is None else world.size
            result = pipeline.edit(image, config.prompt, sampler=config.sampler, seed=config.seed,
                                   guidance=config.guidance, height=config.height, width=config.width,
                                   on_step=on_step)  # fmt: skip
        result.warnings[:0] = image_notices
        if world is None or world.main:
            save_image(result.images[0], config.out, config.out_format)
    finally:
        if world is not None:
            world.close()
    dtype = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}.get(str(pipeline.dtype), str(pipeline.dtype))
    where = source.device if world is None else f"{world.size} x {source.device} (context parallel)"
    report = InferReport(result, load_s, source.name + lora_label(loras), where, dtype)
    cache = pipeline.first_block_cache  # engines built with --first-block-cache
    if cache is not None:
        report.cache, report.fbc_threshold = cache.stats(), cache.threshold
    return report


def check_split_before_launch(config: InferConfig) -> None:
    """``--gpus N``, in the parent before it starts the N workers (each of which would load the whole model before
    finding it): raise InputError when the edit's tokens do not split evenly over them. The geometry is the one the
    workers compute: the reference at its preferred Kontext size, the target that size or the explicit one fitted
    to the default area. Where the model's VAE config cannot be read, the workers check it after loading."""
    scale = vae_scale(config.model) if config.gpus > 1 and config.model is not None else None
    if scale is None:
        return
    image, _ = load_image(config.image)
    multiple_of = 2 * scale  # one 2x2 patch of latents a token
    target, reference = wanted_geometry(image.size, config.height, config.width, DEFAULT_MAX_AREA, multiple_of)
    check_split(FluxKontextComponents.max_sequence_length, multiple_of, target, reference, config.gpus)


def run_device(config: InferConfig) -> str:
    """Where the edit runs: ``--device`` as given; ``auto``: the CPU for engines built for it (``engines_device``),
    else cuda where PyTorch sees a GPU (where it sees none, engines that need one say so as they load). ``config`` as
    for ``pipeline_source``."""
    if config.device == "auto" and config.engines is not None and engines_device(config.engines) == "cpu":
        return "cpu"
    return config.resolved_device


def pipeline_source(config: InferConfig, device: str) -> EngineSource | ModelSource:
    """What the edit's pipeline loads, as the narrow options of the layer that loads it: the engines, or the model
    (in the 24 GB mode when asked). ``config`` is an ``InferConfig`` or anything with its source fields (``engines``,
    ``fbc``, ``fbc_threshold``, ``low_vram``, ``model``, ``resolved_dtype``, ``vae``), as ``fluxtrt serve``'s."""
    if config.engines is not None:
        return EngineSource(config.engines, device, config.fbc_threshold, config.fbc is not None)
    if config.low_vram:
        return ModelSource(ModelOptions.low_vram_mode(config.model, device, config.resolved_dtype, vae=config.vae))
    return ModelSource(ModelOptions(config.model, device, config.resolved_dtype, vae=config.vae))
