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
    """An edit written to disk: the pipeline's result plus model load time."""

    result: EditResult
    load_s: float
    model: str
    device: str
    dtype: str


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

        pipeline = load_engine_pipeline(config.engines, device)
        source = f"engines {config.engines}"
    elif config.low_vram:
        pipeline = low_vram_pipeline(config, device)
        source = f"{config.model} (low-VRAM)"
    else:
        components = load_components(config.model, device, config.resolved_dtype, seed=0, vae=config.vae)
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
    return InferReport(result, load_s, source, device, dtype)


def low_vram_pipeline(config: InferConfig, device: str) -> Any:
    """The 24 GB mode's pipeline (DESIGN 12): eager, FP8 transformer linears quantized block by block as they reach
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
