"""An engines directory back into a ``KontextPipeline``: runners from the manifest's backend, tokenizers beside."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fluxtrt.engines.backend import LoadJob, get_backend
from fluxtrt.engines.build import COMPUTE_DTYPE
from fluxtrt.engines.manifest import Manifest
from fluxtrt.errors import EngineError, FluxtrtError
from fluxtrt.specs import COMPONENTS, component_specs


def load_engine_pipeline(path: Path, device: str = "cpu"):
    """A pipeline whose five runners are the engines in ``path``.

    Args:
        path: an engines directory written by ``fluxtrt build``.
        device: where the engines run (``cpu`` or ``cuda``).

    Returns:
        A ``KontextPipeline`` that refuses edits outside the built resolution and batch range.

    Raises:
        EngineError: missing/unreadable manifest, a component not built, a missing or truncated engine file, an
            unknown backend, or an engine the backend cannot load.
    """
    from transformers import CLIPTokenizer, T5TokenizerFast

    from fluxtrt.models.loading import torch_dtype
    from fluxtrt.pipeline.kontext import EditLimits, KontextPipeline

    path = Path(path)
    manifest = Manifest.load(path)
    try:
        backend = get_backend(manifest.backend)
    except FluxtrtError:
        raise EngineError(
            f"{path}/manifest.json names backend '{manifest.backend}', which this fluxtrt does not know: rebuild "
            "with `fluxtrt build --backend onnxruntime|aotinductor|tensorrt`"
        ) from None
    backend.check_available()
    missing = [c for c in COMPONENTS if c not in manifest.components]
    if missing:
        raise EngineError(
            f"{path} has no engines for {', '.join(missing)}: finish the build with `fluxtrt build --out {path} "
            f"--components {','.join(missing)}` (same model, backend and precision)"
        )
    dtype = torch_dtype(COMPUTE_DTYPE[manifest.precision])
    specs = component_specs(manifest.dims)
    runners = {}
    for name in COMPONENTS:
        entry = manifest.components[name]
        for extra in entry.engine_extra:
            extra.check(path, name)
        engine = entry.engine.check(path, name)
        job = LoadJob(specs[name], engine, device, dtype, asdict(entry))
        runners[name] = backend.load(job)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
        tokenizer_2 = T5TokenizerFast.from_pretrained(str(path / "tokenizer_2"), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EngineError(f"{path}: the tokenizers beside the engines cannot be read ({exc}): rebuild") from None
    model = manifest.model
    return KontextPipeline(
        runners=runners,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        dims=manifest.dims,
        vae_scaling=model["vae_scaling"],
        vae_shift=model["vae_shift"],
        scheduler_config=model["scheduler_config"],
        device=device,
        dtype=dtype,
        limits=EditLimits(manifest.resolution("min"), manifest.resolution("max"), manifest.batch["max"], str(path)),
    )
