"""The engines' per-step transformer error in ``fluxtrt compare``: each step's engine output against PyTorch's on the
very same inputs, computed in FP32 where the device has room for it.

Why FP32: in BF16, diffusers' FLUX transformer rounds ``timestep * 1000`` and ``guidance * 1000`` to BF16, which
changes every block's modulation; an engine compiled whole keeps those products in FP32. On random-full the BF16
transformer is 22-26% (relative L2) from FP32 at every step of an edit (benchmarks/results/README.md,
reference_steps_h200.json), so a BF16 reference would report its own error as the engine's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fluxtrt.config import COMPUTE_DTYPE
from fluxtrt.engines.manifest import Manifest
from fluxtrt.environment import free_device_memory


def engine_step_error(path: Path, calls: list, session: Any) -> dict:
    """Per denoising step, the engine transformer's output (``calls``: recorded (feed, outputs) pairs) against the
    PyTorch transformer of ``session``'s model on the very same inputs.

    Teacher-forced (every step gets the engine's own inputs), so the figures measure the engine's numerical error
    at each step rather than how two trajectories drift apart. The PyTorch transformer is loaded at the engines'
    compute precision and, where the device has room, converted to FP32 (exact from BF16) and run on FP32 inputs
    (``reference``: which of the two it was). Engines built from another model are not compared.
    """
    import torch

    from fluxtrt.backends.torch_modules import TransformerModule
    from fluxtrt.models import load_components
    from fluxtrt.models.loading import model_fingerprint

    manifest = Manifest.load(path)
    # The transformer is what is compared: engines built with the slim VAE compare against the same model.
    if manifest.model["fingerprint"] != model_fingerprint(session.model, session.seed, manifest.model.get("vae")):
        return {"error": f"engines built from {manifest.model['source']}, compare model is {session.model}"}
    session.release()
    components = load_components(session.model, session.device, COMPUTE_DTYPE[manifest.precision], seed=session.seed)
    reference = as_fp32_where_it_fits(components.transformer)
    dtype = next(components.transformer.parameters()).dtype
    module = TransformerModule(components.transformer)
    names = [t.name for t in module_inputs(manifest)]
    rel, max_abs = [], []
    with torch.inference_mode():
        for feed, out in calls:
            args = (feed[n].to(dtype) if feed[n].is_floating_point() else feed[n] for n in names)
            ref = module(*args).float()
            got = out["noise_pred"].float()
            rel.append(((got - ref).norm() / ref.norm()).item())
            max_abs.append((got - ref).abs().max().item())
    del components, module
    free_device_memory()
    return {
        "precision": manifest.precision,
        "reference": reference,
        "steps": len(rel),
        "rel_l2": rel,
        "max_abs": max_abs,
        "max_rel_l2": max(rel) if rel else None,
    }


def as_fp32_where_it_fits(transformer: Any) -> str:
    """Convert ``transformer`` to FP32 in place unless the device runs out of memory doing it (then it is put back
    in its own dtype, exactly: its weights came from it). Returns what it computes in: ``"fp32"`` or, say,
    ``"bf16 (fp32 did not fit on the GPU)"``."""
    import torch

    dtype = next(transformer.parameters()).dtype
    if dtype == torch.float32:
        return "fp32"
    try:
        transformer.to(torch.float32)
        return "fp32"
    except torch.OutOfMemoryError:
        transformer.to(dtype)
        free_device_memory()
        return f"{str(dtype).removeprefix('torch.').replace('bfloat16', 'bf16')} (fp32 did not fit on the GPU)"


def module_inputs(manifest: Any) -> tuple:
    """The transformer spec's inputs for the manifest's model dimensions."""
    from fluxtrt.specs import component_specs

    return component_specs(manifest.dims)["transformer"].inputs
