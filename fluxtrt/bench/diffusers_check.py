"""The harness-overhead check: diffusers' own FluxKontextPipeline on the same modules, its transformer calls timed by
hooks with the same ComponentTimer (CUDA events on a GPU) that times fluxtrt's pipeline."""

from __future__ import annotations

import time
from typing import Any

import torch

from fluxtrt.timing import ComponentTimer


def diffusers_transformer_timing(
    components: Any,
    image: Any,
    prompt: str,
    steps: int,
    seed: int,
    guidance: float,
    height: int | None = None,
    width: int | None = None,
    max_area: int | None = None,
) -> dict[str, float]:
    """Run diffusers' FluxKontextPipeline (Euler, ``steps`` steps) and time every transformer call.

    Returns:
        ``transformer_ms_per_step``, ``calls`` and the edit's ``wall_s``.
    """
    pipe = components.diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    device = components.transformer.device
    timer = ComponentTimer(device)
    open_regions: list[Any] = []

    def pre(_module, _args, _kwargs):
        open_regions.append(timer.region("transformer"))
        open_regions[-1].__enter__()

    def post(_module, _args, _kwargs, _output):
        open_regions.pop().__exit__(None, None, None)

    handles = [
        pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True),
        pipe.transformer.register_forward_hook(post, with_kwargs=True),
    ]
    size = {"height": height, "width": width} if height is not None and width is not None else {}
    if max_area is not None:
        size["max_area"] = max_area
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(
            image=image,
            prompt=prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            **size,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    calls = timer.calls["transformer"]
    return {"transformer_ms_per_step": timer.summary()["transformer"] / calls, "calls": calls, "wall_s": wall}
