"""``fluxtrt infer``: one image edit from a frozen ``InferConfig``."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxtrt.config import InferConfig
from fluxtrt.environment import check_device
from fluxtrt.errors import FluxtrtError
from fluxtrt.io import atomic_write
from fluxtrt.models.options import ModelOptions
from fluxtrt.pipeline.first_block_cache import CacheStats
from fluxtrt.pipeline.kontext import DEFAULT_MAX_AREA, EditResult, KontextPipeline
from fluxtrt.pipeline.model import ModelSource


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
    from fluxtrt.pipeline.image import load_image

    device = config.resolved_device
    source = pipeline_source(config, device)
    loras = read_loras(config.loras)
    check_device(device)
    image, image_notices = load_image(config.image)
    world = split = None
    if config.gpus > 1:
        from fluxtrt.parallel.context import enable_context_parallel, init_world

        world = init_world(config.gpus, device)
        split = functools.partial(enable_context_parallel, world=world)
    try:
        t0 = time.perf_counter()
        pipeline = load_pipeline(source, loras, prepare=split)
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
    cache = pipeline.first_block_cache  # engines built with --first-block-cache
    if cache is None:
        return InferReport(result, load_s, source.name + lora_label(loras), where, dtype)
    return InferReport(result, load_s, source.name + lora_label(loras), where, dtype, cache.stats(), cache.threshold)


@dataclass(frozen=True)
class EngineSource:
    """A pipeline's engines (``infer --engines``), loaded by ``fluxtrt.engines.load.load_engine_pipeline``.

    Args:
        path: the engines directory.
        device: where they run.
        fbc_threshold: the first-block cache's threshold where the engines hold the transformer's parts (None: off).
        require_fbc: raise when they do not (the threshold was given explicitly).
    """

    path: Path
    device: str
    fbc_threshold: float | None
    require_fbc: bool

    @property
    def name(self) -> str:
        """What the pipeline runs, for the report."""
        return f"engines {self.path}"

    def load(self, prepare: Callable[[Any], None] | None = None) -> KontextPipeline:
        """Load the engines. ``prepare`` must be None: engines hold no transformer module (``InferConfig`` refuses
        ``--gpus`` with ``--engines``).

        Raises:
            FluxtrtError: as ``load_engine_pipeline``.
        """
        from fluxtrt.engines.load import load_engine_pipeline

        if prepare is not None:
            raise ValueError("engines hold no transformer module to prepare")
        return load_engine_pipeline(self.path, self.device, self.fbc_threshold, self.require_fbc)


def pipeline_source(config: InferConfig, device: str) -> EngineSource | ModelSource:
    """What the edit's pipeline loads, as the narrow options of the layer that loads it: the engines, or the model
    (in the 24 GB mode when asked). ``config`` is an ``InferConfig`` or anything with its source fields (``engines``,
    ``fbc``, ``fbc_threshold``, ``low_vram``, ``model``, ``resolved_dtype``, ``vae``), as ``fluxtrt serve``'s."""
    if config.engines is not None:
        return EngineSource(config.engines, device, config.fbc_threshold, config.fbc is not None)
    if config.low_vram:
        return ModelSource(ModelOptions.low_vram_mode(config.model, device, config.resolved_dtype, vae=config.vae))
    return ModelSource(ModelOptions(config.model, device, config.resolved_dtype, vae=config.vae))


def load_pipeline(source: EngineSource | ModelSource, loras: list[Any], prepare: Callable[[Any], None] | None = None):
    """``source``'s pipeline with ``loras`` (read by ``read_loras``) merged into its transformer: fused into the
    PyTorch weights before ``prepare`` (``--gpus``) sees them, or handed to the loaded transformer engine.

    Raises:
        FluxtrtError: as the source's ``load``, or a LoRA that does not fit the transformer (nothing stays loaded).
    """
    if not loras:
        return source.load(prepare=prepare)
    if isinstance(source, EngineSource):
        from fluxtrt.lora.engines import apply_to_runner

        pipeline = source.load(prepare=prepare)
        try:
            apply_to_runner(pipeline.runners["transformer"], loras)
        except BaseException:
            pipeline.close()
            raise
        return pipeline
    from fluxtrt.lora.fuse import fuse

    def fused(transformer: Any) -> None:
        fuse(transformer, loras)
        if prepare is not None:
            prepare(transformer)

    return source.load(prepare=fused)


def read_loras(specs: tuple[str, ...]) -> list[Any]:
    """The ``--lora FILE[:SCALE]`` files read (before any model is loaded, so that a bad one costs nothing)."""
    if not specs:
        return []
    from fluxtrt.lora.files import LoraSpec, read_lora

    return [read_lora(LoraSpec.parse(text)) for text in specs]


def lora_label(loras: list[Any]) -> str:
    """`` + LoRA NAME:SCALE`` per LoRA, for the report."""
    return "".join(f" + LoRA {lora.name}:{lora.spec.scale:g}" for lora in loras)


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
