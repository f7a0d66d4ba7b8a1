"""The engines' per-step transformer error in ``fluxtrt compare``: each step's engine output against PyTorch's on the
very same inputs, computed in FP32 where the device has room for it (checked before, not found by running out of it).

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
    compute precision, with the session's LoRAs fused as the engines have them merged, and, where the device has
    room, converted to FP32 (exact from BF16) and run on FP32 inputs (``reference``: which of the two it was).
    Engines built from another model are not compared.
    """
    import torch

    from fluxtrt.backends.torch_modules import TransformerModule
    from fluxtrt.models import load_components
    from fluxtrt.models.loading import model_fingerprint

    manifest = Manifest.load(path)
    # The transformer is what is compared: engines built with the slim VAE compare against the same model.
    if manifest.model.fingerprint != model_fingerprint(session.model, session.seed, manifest.model.vae):
        return {"error": f"engines built from {manifest.model.source}, compare model is {session.model}"}
    session.release()
    components = load_components(session.model, session.device, COMPUTE_DTYPE[manifest.precision], seed=session.seed)
    if session.loras:  # the engines edited with them merged: the reference has them fused, at the engines' precision
        from fluxtrt.lora.fuse import fuse

        fuse(components.transformer, session.loras)
    tokens = max((feed["hidden_states"].shape[1] for feed, _ in calls), default=0)
    reference = as_fp32_where_it_fits(components.transformer, tokens)
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


# Bytes of FP32 activations per token that one transformer call holds at its peak beyond the weights (hidden states,
# the MLP's 4x expansion, Q/K/V and the attention output, with headroom), per unit of the hidden width.
ACTIVATION_BYTES_PER_TOKEN_WIDTH = 4 * 24


def fp32_room(transformer: Any, tokens: int) -> tuple[int, int | None]:
    """(bytes converting ``transformer`` to FP32 and running it on ``tokens`` tokens needs beyond what it holds now,
    bytes available on its device; None where that cannot be read)."""
    from fluxtrt.environment import available_memory

    params = list(transformer.parameters())
    held = sum(p.numel() * p.element_size() for p in params)
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    needed = sum(p.numel() for p in params) * 4 - held + tokens * width * ACTIVATION_BYTES_PER_TOKEN_WIDTH
    device = params[0].device
    return needed, available_memory(str(device)) if device.type == "cuda" else None


def as_fp32_where_it_fits(transformer: Any, tokens: int = 0, free: int | None = None) -> str:
    """Convert ``transformer`` to FP32 in place where its device has room for the FP32 weights and one call's
    activations on ``tokens`` tokens (checked before converting, so nothing runs out of memory half way).

    Args:
        transformer: the PyTorch transformer, converted in place.
        tokens: the longest sequence it will be called on.
        free: bytes available on its device (default: read from the device; a CPU is not checked).

    Returns:
        What it computes in: ``"fp32"``, or its own dtype with the reason, e.g. ``"bf16 (fp32 needs 24.1 GiB more,
        9.8 GiB free on the GPU)"``.
    """
    import torch

    dtype = next(transformer.parameters()).dtype
    if dtype == torch.float32:
        return "fp32"
    needed, available = fp32_room(transformer, tokens)
    free = available if free is None else free
    if free is not None and free < needed:
        name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16")
        return f"{name} (fp32 needs {needed / 2**30:.1f} GiB more, {free / 2**30:.1f} GiB free on the GPU)"
    transformer.to(torch.float32)
    return "fp32"


def module_inputs(manifest: Any) -> tuple:
    """The transformer spec's inputs for the manifest's model dimensions."""
    from fluxtrt.specs import component_specs

    return component_specs(manifest.dims)["transformer"].inputs
