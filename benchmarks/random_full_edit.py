"""Full-size random-weight Kontext edit on a GPU: fluxtrt's pipeline against diffusers' own on the same components.

    python -m benchmarks.random_full_edit --out results.json [--steps 28] [--size 1024] [--model random-full]

(``--model tiny --device cpu`` runs the same script in seconds, as a smoke test.)

Prints one JSON line per phase (so a cut-short run still reports) and writes them all to --out; a phase that fails is
one record with a one-line reason (its traceback in a log beside --out), and the phases that do not need it still run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks.records import Records
from fluxtrt.backends.recording import RecordingRunner
from fluxtrt.config import SamplerConfig
from fluxtrt.environment import environment
from fluxtrt.models import load_components
from fluxtrt.pipeline.kontext import KontextPipeline
from fluxtrt.timing import ComponentTimer


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def diffusers_edit(components, image, prompt: str, steps: int, seed: int) -> dict:
    """diffusers' FluxKontextPipeline on the same modules; transformer calls timed in hooks (CUDA events on a GPU)."""
    pipe = components.diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    timer = ComponentTimer(components.transformer.device)
    regions = []

    def pre(_module, _args, kwargs):
        if not first_inputs:
            first_inputs.update({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        regions.append(timer.region("transformer"))
        regions[-1].__enter__()

    first_inputs: dict[str, torch.Tensor] = {}

    def post(_module, _args, _kwargs, output):
        regions[-1].__exit__(None, None, None)
        outputs.append(output[0].detach().clone())  # stays on the device: no sync inside the timed loop

    outputs: list[torch.Tensor] = []

    handles = [
        pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True),
        pipe.transformer.register_forward_hook(post, with_kwargs=True),
    ]
    sync()
    t0 = time.perf_counter()
    latents = pipe(
        image=image,
        prompt=prompt,
        num_inference_steps=steps,
        guidance_scale=2.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).images
    sync()
    wall = time.perf_counter() - t0
    for h in handles:
        h.remove()
    return {
        "latents": latents.float().cpu(),
        "wall_s": wall,
        "transformer_ms": timer.summary()["transformer"],
        "transformer_calls": timer.calls["transformer"],
        "outputs": outputs,
        "first_inputs": first_inputs,
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu().flatten(), b.float().cpu().flatten()
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--model", default="random-full")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    prompt, seed = "make the house blue", 0
    image = Image.open(Path(__file__).resolve().parents[1] / "examples" / "input.png").convert("RGB")
    image = image.resize((args.size, args.size), Image.Resampling.LANCZOS)

    records = Records(args.out)
    records.emit({"phase": "environment", **environment()})
    dtype = "bf16" if args.device == "cuda" else "fp32"
    with records.phase("load") as loaded:
        t0 = time.perf_counter()
        components = load_components(args.model, args.device, dtype, seed=0)
        sync()
        memory = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None
        records.emit({"phase": "load", "model": args.model, "dtype": dtype, "seconds": time.perf_counter() - t0,
                      "gpu_mem_gib": memory})  # fmt: skip
    if loaded.failed:
        for name in ("warmup", "fluxtrt_edit", "diffusers_edit"):
            records.skip(name, loaded.blocks())
        return records.done()
    pipeline = KontextPipeline.from_components(components)
    sampler = SamplerConfig("euler", "flux-shift", args.steps)

    with records.phase("warmup"):
        t0 = time.perf_counter()
        pipeline.edit(image, prompt, sampler=SamplerConfig("euler", "flux-shift", 2), seed=seed)
        records.emit({"phase": "warmup", "steps": 2, "seconds": time.perf_counter() - t0})

    ours = None
    with records.phase("fluxtrt_edit") as edited:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        recorder = RecordingRunner(pipeline.runners["transformer"])
        pipeline.runners["transformer"] = recorder
        ours = pipeline.edit(image, prompt, sampler=sampler, seed=seed)
        records.emit(fluxtrt_record(ours))
    if edited.failed:
        records.skip("diffusers_edit", edited.blocks())  # its figures are differences from fluxtrt's edit
        return records.done()
    with records.phase("diffusers_edit"):
        records.emit(diffusers_record(diffusers_edit(components, image, prompt, args.steps, seed), ours, recorder))
    return records.done()


def fluxtrt_record(ours) -> dict:
    steps = ours.calls["transformer"]
    return {
        "phase": "fluxtrt_edit",
        "steps": steps,
        "target": str(ours.target),
        "reference": str(ours.reference),
        "timings_ms": ours.timings_ms,
        "transformer_ms_per_step": ours.timings_ms["transformer"] / steps,
        "latents_finite": bool(torch.isfinite(ours.latents).all()),
        "latents_std": ours.latents.std().item(),
        "latents_absmax": ours.latents.abs().max().item(),
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


def diffusers_record(theirs: dict, ours, recorder: RecordingRunner) -> dict:
    """diffusers' edit against fluxtrt's: time per transformer step, final latents and per-step outputs."""
    theirs_ms = theirs["transformer_ms"] / theirs["transformer_calls"]
    ours_ms = ours.timings_ms["transformer"] / ours.calls["transformer"]
    diff = (ours.latents - theirs["latents"]).abs()
    return {
        "phase": "diffusers_edit",
        "steps": theirs["transformer_calls"],
        "wall_s": theirs["wall_s"],
        "transformer_ms_per_step": theirs_ms,
        "fluxtrt_over_diffusers_transformer": ours_ms / theirs_ms,
        "latents_max_abs_diff": diff.max().item(),
        "latents_mean_abs_diff": diff.mean().item(),
        "latents_cosine": cosine(ours.latents, theirs["latents"]),
        # Per step, the transformer outputs of the two pipelines: equal inputs give cosine ~1 at step 0; a random
        # full-size network may amplify bf16 rounding differences along the trajectory.
        "first_call_input_max_abs_diff": {
            k: (v.float() - theirs["first_inputs"][k].float()).abs().max().item()
            for k, v in recorder.calls[0][0].items()
            if k in theirs["first_inputs"] and v.shape == theirs["first_inputs"][k].shape
        },
        "first_call_input_dtypes": {
            k: [str(v.dtype), str(theirs["first_inputs"].get(k, v).dtype)] for k, v in recorder.calls[0][0].items()
        },
        "noise_pred_cosine_per_step": [
            cosine(out["noise_pred"], b) for (_, out), b in zip(recorder.calls, theirs["outputs"], strict=False)
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
