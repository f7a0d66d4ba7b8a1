"""Loading the pipeline once and warming it up, so that the first request costs what every later one costs."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any

from fluxtrt.config import SamplerConfig
from fluxtrt.errors import InputError
from fluxtrt.serve.options import ServedSource
from fluxtrt.specs.flux import Resolution

# The warm-up size of a model (engines warm up at their opt resolution).
MODEL_WARMUP_SIZE = Resolution(1024, 1024)
WARMUP_PROMPT = "warm-up edit"


@dataclass
class Loaded:
    """A loaded pipeline and what the server tells about it.

    Attributes:
        pipeline: the ``KontextPipeline``; only the worker thread calls it.
        label: what it runs (``engines DIR`` or the model), as the web page and /ready show it.
        max_batch: images one pipeline call may make.
        tokenizer: a copy of the T5 tokenizer for checking prompts outside the worker thread.
        max_tokens: the T5 tokens a prompt may have.
        opt_size: the size the engines are tuned for (None for a model).
        load_s, warmup_s: seconds spent loading and warming up.
        loras: the ``fluxtrt.serve.loras.LoraSwitch`` over the transformer, or None when no LoRA is served.
    """

    pipeline: Any
    label: str
    max_batch: int
    tokenizer: Any
    max_tokens: int
    opt_size: Resolution | None
    device: str
    load_s: float = 0.0
    warmup_s: float = 0.0
    loras: Any = None


def built_batch(pipeline: Any) -> int | None:
    """The largest batch every runner accepts (an engine's built range); None when no runner bounds it."""
    highs = [runner.ranges["B"][1] for runner in pipeline.runners.values() if "B" in getattr(runner, "ranges", {})]
    return min(highs) if highs else None


def load(source: ServedSource, max_batch: int | None = None) -> Loaded:
    """Load ``source``'s pipeline as ``fluxtrt infer`` does.

    Args:
        source: the model or engines.
        max_batch: images per pipeline call; None: the engines' built batch, 1 for a model.

    Raises:
        FluxtrtError: what loading raises; InputError when ``max_batch`` exceeds the engines' built batch.
    """
    from fluxtrt.environment import check_device
    from fluxtrt.infer import pipeline_source, run_device

    device = run_device(source)
    check_device(device)
    t0 = time.perf_counter()
    pipeline = pipeline_source(source, device).load()
    try:
        loaded = wrap(pipeline, source.label, max_batch, device)
    except BaseException:
        pipeline.close()
        raise
    loaded.load_s = time.perf_counter() - t0
    if source.engines is not None:
        from fluxtrt.engines.manifest import Manifest

        loaded.opt_size = Manifest.load(source.engines).resolution("opt")
    return loaded


def wrap(pipeline: Any, label: str, max_batch: int | None, device: str = "cpu") -> Loaded:
    """A loaded pipeline with what the server needs to know about it (see ``load``)."""
    built = built_batch(pipeline)
    if max_batch is not None and built is not None and max_batch > built:
        raise InputError(
            f"--max-batch is {max_batch} but the {label} take at most batch {built}: pass --max-batch {built} or "
            f"less, or build the engines with --max-batch {max_batch}"
        )
    batch = max_batch or built or 1
    tokenizer = copy.deepcopy(pipeline.tokenizer_2)
    return Loaded(pipeline, label, batch, tokenizer, pipeline.dims.t5_len, None, device)


def warm_up(loaded: Loaded, sampler: SamplerConfig, size: Resolution | None, steps: int,
            keep_reference_size: bool) -> None:  # fmt: skip
    """Run the edits a server's first requests would otherwise pay for: batch 1 and the largest batch, at ``size``
    (None: the engines' opt resolution, else ``MODEL_WARMUP_SIZE``), ``steps`` steps each (0: none), so that kernels
    and plans are loaded, autotuned and allocated before the server reports ready."""
    if steps < 1:
        return
    from PIL import Image

    size = size or loaded.opt_size or MODEL_WARMUP_SIZE
    image = Image.linear_gradient("L").convert("RGB").resize((size.width, size.height))
    sampler = replace(sampler, steps=steps)
    t0 = time.perf_counter()
    for batch in sorted({1, loaded.max_batch}):
        loaded.pipeline.edit([image] * batch, [WARMUP_PROMPT] * batch, sampler=sampler, seed=list(range(batch)),
                             height=size.height, width=size.width, max_area=size.width * size.height,
                             auto_resize=not keep_reference_size)  # fmt: skip
    _synchronize(loaded.device)
    loaded.warmup_s = time.perf_counter() - t0


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
