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
from fluxtrt.pipeline.kontext import DEFAULT_MAX_AREA, EditResult


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
    from fluxtrt.pipeline.image import load_image

    device = config.resolved_device
    check_device(device)
    image, image_notices = load_image(config.image)
    world = None
    if config.gpus > 1:
        from fluxtrt.parallel.context import init_world

        world = init_world(config.gpus, device)
    try:
        t0 = time.perf_counter()
        pipeline, source = _load_pipeline(config, device, world)
        load_s = time.perf_counter() - t0
        with pipeline:
            if world is not None:
                from fluxtrt.parallel.context import check_sequence

                geometry = pipeline.geometry(image.size, config.height, config.width, DEFAULT_MAX_AREA)
                check_sequence(pipeline.dims, *geometry, world.size)
            result = pipeline.edit(image, config.prompt, sampler=config.sampler, seed=config.seed,
                                   guidance=config.guidance, height=config.height, width=config.width,
                                   on_step=on_step)  # fmt: skip
        result.warnings[:0] = image_notices
        if world is None or world.main:
            save_image(result.images[0], config)
    finally:
        if world is not None:
            world.close()
    dtype = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}.get(str(pipeline.dtype), str(pipeline.dtype))
    where = device if world is None else f"{world.size} x {device} (context parallel)"
    stats = getattr(pipeline.runners["transformer"], "stats", None)  # engines built with --first-block-cache
    cache = stats() if stats is not None else None
    threshold = pipeline.runners["transformer"].threshold if cache is not None else None
    return InferReport(result, load_s, source, where, dtype, cache, threshold)


def _load_pipeline(config: InferConfig, device: str, world: Any) -> tuple[Any, str]:
    """The pipeline of an edit and what it runs (engines or a model, its transformer split over ``world``)."""
    from fluxtrt.models import load_components
    from fluxtrt.pipeline.kontext import KontextPipeline

    loras = read_loras(getattr(config, "loras", ()))
    if config.engines is not None:
        from fluxtrt.engines.load import load_engine_pipeline

        pipeline = load_engine_pipeline(config.engines, device, config.fbc_threshold, config.fbc is not None)
        if loras:
            from fluxtrt.lora.engines import apply_to_runner

            try:
                apply_to_runner(pipeline.runners["transformer"], loras)
            except BaseException:
                pipeline.close()
                raise
        return pipeline, f"engines {config.engines}" + lora_label(loras)
    if config.low_vram:
        return low_vram_pipeline(config, device), f"{config.model} (low-VRAM)"
    components = load_components(config.model, device, config.resolved_dtype, seed=0, vae=config.vae)
    if loras:
        from fluxtrt.lora.fuse import fuse

        fuse(components.transformer, loras)
    if world is not None:
        from fluxtrt.parallel.context import enable_context_parallel

        enable_context_parallel(components.transformer, world)
    return KontextPipeline.from_components(components), config.model + lora_label(loras)


def read_loras(specs: tuple[str, ...]) -> list[Any]:
    """The ``--lora FILE[:SCALE]`` files read (before any model is loaded, so that a bad one costs nothing)."""
    if not specs:
        return []
    from fluxtrt.lora.files import LoraSpec, read_lora

    return [read_lora(LoraSpec.parse(text)) for text in specs]


def lora_label(loras: list[Any]) -> str:
    return "".join(f" + LoRA {lora.name}:{lora.spec.scale:g}" for lora in loras)


def low_vram_pipeline(config: InferConfig, device: str) -> Any:
    """The 24 GB mode's pipeline (DESIGN 13): eager, FP8 transformer linears quantized block by block as they reach
    the GPU (required on CUDA: a bf16 transformer does not fit), text encoders streamed from the host, the VAE tiled
    above 1024 px a side. On the CPU nothing is quantized and the placement changes nothing but the order of work.

    Raises:
        DeviceError, MissingDependencyError: on CUDA, no FP8 linears (a GPU below sm89, or no torchao).
    """
    from fluxtrt.pipeline.kontext import KontextPipeline
    from fluxtrt.stages.config import StageConfig
    from fluxtrt.stages.lowvram import load_low_vram

    cuda = device.startswith("cuda")
    stage = StageConfig("infer:lowvram=on", quant="fp8" if cuda else None, low_vram=True,
                        vae="tiny" if config.vae is not None else "full")  # fmt: skip
    staged = load_low_vram(config.model, device, config.resolved_dtype, stage, tiny_vae=config.vae or "tiny",
                           strict=cuda)  # fmt: skip
    applied = staged.apply(stage, strict=cuda)
    return KontextPipeline.from_components(staged.components, runners=applied.runners)


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
