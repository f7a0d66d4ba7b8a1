"""Loading an engines directory as a ``KontextPipeline`` whose runners are its engines."""

from __future__ import annotations

from pathlib import Path

from fluxtrt.backends.base import LoadJob, get_backend
from fluxtrt.config import COMPUTE_DTYPE
from fluxtrt.engines.manifest import Manifest
from fluxtrt.errors import EngineError, FluxtrtError
from fluxtrt.specs.flux import COMPONENTS, component_specs


def load_engine_pipeline(path: Path, device: str = "cpu"):
    """A ``KontextPipeline`` whose runners are the engines in ``path``, loaded.

    Args:
        path: an engines directory written by ``fluxtrt build``.
        device: where the engines run (``cpu`` or ``cuda``).

    Returns:
        A ``KontextPipeline`` whose runners refuse shapes outside the built range (close it to free the engines).

    Raises:
        EngineError: missing/unreadable manifest, a component not built, a missing or truncated engine file, an
            unknown backend, or an engine the backend cannot load.
    """
    from transformers import CLIPTokenizer, T5TokenizerFast

    from fluxtrt.models.loading import torch_dtype
    from fluxtrt.pipeline.kontext import KontextPipeline

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
        vae = f" --vae {manifest.model['vae']}" if manifest.model.get("vae") else ""
        raise EngineError(
            f"{path} has no engines for {', '.join(missing)}: finish the build with `fluxtrt build --model "
            f"{manifest.model['source']}{vae} --backend {manifest.backend} --precision {manifest.precision} "
            f"--out {path} --components {','.join(missing)}` (and the original build's range options)"
        )
    dtype = torch_dtype(COMPUTE_DTYPE[manifest.precision])
    specs = component_specs(manifest.dims)
    runners = {}
    try:
        for name in COMPONENTS:
            entry = manifest.components[name]
            for extra in entry.engine_extra:
                extra.check(path, name)
            engine = entry.engine.check(path, name)
            options = backend.options(entry.settings.get("options", {}))
            job = LoadJob(specs[name], engine, device, dtype, entry.profile, options, entry.record)
            runners[name] = backend.load(job)
        tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
        tokenizer_2 = T5TokenizerFast.from_pretrained(str(path / "tokenizer_2"), local_files_only=True)
    except (OSError, ValueError) as exc:
        _close(runners)
        raise EngineError(f"{path}: the tokenizers beside the engines cannot be read ({exc}): rebuild") from None
    except BaseException:
        _close(runners)
        raise
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
        source=str(path),
    )


def _close(runners: dict) -> None:
    for runner in runners.values():
        runner.close()
