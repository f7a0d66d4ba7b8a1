"""``fluxtrt build``: checkpoint -> ONNX per component -> engine per component -> manifest, atomically.

Each component is exported and compiled in a staging directory and moved into place only when complete; the
manifest is rewritten after every component, so an interrupted build keeps what it finished and leaves nothing
that looks finished but is not. A component is skipped when its recorded settings hash and files still match.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fluxtrt import __version__
from fluxtrt.config import BuildConfig
from fluxtrt.engines.backend import BuildJob, EngineBackend, get_backend
from fluxtrt.engines.manifest import ComponentEntry, FileRecord, Manifest, sha256_file
from fluxtrt.errors import EngineError, InputError
from fluxtrt.quant import QUANTIZED_PRECISIONS
from fluxtrt.specs.flux import FluxDims, Resolution, component_dims, profile_shapes

STAGING_PREFIX = ".staging-"
# Compute dtype of the exported graph per precision; fp8/fp4 quantise a bf16 graph.
COMPUTE_DTYPE = {"fp32": "fp32", "bf16": "bf16", "fp8": "bf16", "fp4": "bf16"}

Progress = Callable[[str, str], None]  # (component, what is happening)


@dataclass
class ComponentResult:
    """What happened to one component in this build."""

    name: str
    status: str  # "built" or "up to date"
    seconds: float
    onnx_bytes: int
    engine_bytes: int


@dataclass
class BuildReport:
    """The finished build: the manifest written and what each component did."""

    out: Path
    manifest: Manifest
    results: list[ComponentResult]


def build_engines(
    config: BuildConfig, on_progress: Progress | None = None, backend: EngineBackend | None = None
) -> BuildReport:
    """Build (or bring up to date) the engines directory ``config.out``.

    Args:
        config: what to build.
        on_progress: called with (component, message) as work starts on each step.
        backend: use this backend object instead of looking ``config.backend`` up (for embedding and tests).

    Returns:
        The report; ``config.out/manifest.json`` describes every component built so far.

    Raises:
        FluxtrtError: unavailable backend or device, an out directory holding other engines, export or build
            failure. Completed components stay recorded and usable.
    """
    from fluxtrt.infer import check_device
    from fluxtrt.models import load_components
    from fluxtrt.models.loading import model_fingerprint
    from fluxtrt.specs import component_specs
    from fluxtrt.specs.flux import dims_from_components

    say = on_progress or (lambda component, message: None)
    backend = backend or get_backend(config.backend)
    backend.check_buildable()
    if config.precision not in backend.precisions:
        raise InputError(
            f"--precision is '{config.precision}' but the {backend.name} backend builds "
            f"{', '.join(backend.precisions)}: pick one of those"
        )
    check_device(config.device)
    out = config.out
    previous = _previous_manifest(out, config, backend)
    _remove_leftovers(out)

    say("model", f"loading {config.model} ({COMPUTE_DTYPE[config.precision]}, {config.device})")
    components = load_components(config.model, config.device, COMPUTE_DTYPE[config.precision])
    dims = dims_from_components(components)
    specs = component_specs(dims)
    manifest = Manifest(
        backend=backend.name,
        backend_version=backend.version(),
        precision=config.precision,
        fluxtrt_version=__version__,
        model={
            "source": components.source,
            "fingerprint": model_fingerprint(config.model),
            "dims": asdict(dims),
            "vae_scaling": components.vae.config.scaling_factor,
            "vae_shift": components.vae.config.shift_factor,
            "scheduler_config": components.scheduler_config,
            "max_sequence_length": components.max_sequence_length,
        },
        build_env=_build_env(config.device),
        resolutions={
            "min": str(config.min_resolution),
            "opt": str(config.opt_resolution),
            "max": str(config.max_resolution),
        },  # fmt: skip
        batch={"min": 1, "opt": 1, "max": config.max_batch},
        components=dict(previous.components) if previous else {},
    )
    out.mkdir(parents=True, exist_ok=True)
    _save_tokenizers(components, out)
    manifest.save(out)  # from here on a rerun recognises the directory as its own

    results = []
    for name in config.components:
        spec = specs[name]
        profile = profile_shapes(
            spec, dims, (1, 1, config.max_batch), (config.min_resolution, config.opt_resolution, config.max_resolution)
        )
        settings = {
            "component": name,
            "backend": backend.name,
            "backend_version": manifest.backend_version,
            "precision": config.precision,
            "model": manifest.model["fingerprint"],
            "profile": {k: [list(s) for s in v] for k, v in profile.items()},
            "fluxtrt": __version__,
        }
        if config.backend_options():
            settings["options"] = config.backend_options()
        amax = None
        # Backends that read ONNX take an imported --onnx-dir as it is (already quantized or not).
        imported = backend.uses_onnx and config.onnx_dir is not None
        if name == "transformer" and config.precision in QUANTIZED_PRECISIONS and not imported:
            from fluxtrt.quant.calibrate import calibration_for_build

            say(name, "calibrating (or reusing saved scales)")
            fingerprint = manifest.model["fingerprint"]
            calibration_path, calibration = calibration_for_build(config, components, fingerprint, out)
            amax = calibration.amax
            manifest.calibration = str(calibration_path.relative_to(out))
            settings["calibration"] = sha256_file(calibration_path)
        entry = manifest.components.get(name)
        if not config.force and entry is not None and _up_to_date(entry, settings, out, name):
            say(name, "up to date")
            results.append(ComponentResult(name, "up to date", 0.0, _bytes(entry.onnx), entry.engine.bytes))
            continue
        module = _module(name, components)
        manifest.components.pop(name, None)
        entry = _build_component(name, spec, module, dims, config, backend, settings, profile, out, say, amax)
        manifest.components[name] = entry
        manifest.save(out)
        results.append(ComponentResult(name, "built", entry.build_s, _bytes(entry.onnx), entry.engine.bytes))
    manifest.save(out)
    return BuildReport(out, manifest, results)


def _build_component(name, spec, module, dims, config, backend, settings, profile, out, say, amax=None):
    """Export (if the backend reads ONNX) and compile one component in a staging directory, then move it in.

    With ``amax`` (calibrated input amax per linear), the exported ONNX gets FP8/NVFP4 Q/DQ before the build, or,
    for a backend that reads no ONNX, the job carries the scales (``BuildJob.amax``).
    """
    import torch

    from fluxtrt.models.loading import torch_dtype

    t0 = time.perf_counter()
    staging = out / f"{STAGING_PREFIX}{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "onnx").mkdir(parents=True)
        (staging / "engine").mkdir()
        onnx_path = None
        if backend.uses_onnx and config.onnx_dir is not None:
            from fluxtrt.export.onnx_dir import import_onnx

            say(name, f"using ONNX from {config.onnx_dir}")
            onnx_path = import_onnx(spec, config.onnx_dir, staging / "onnx")
        elif backend.uses_onnx:
            from fluxtrt.export.onnx import export_onnx

            say(name, "exporting ONNX")
            dtype = torch_dtype(COMPUTE_DTYPE[config.precision])
            feed = spec.sample_feed(_sample_dims(name, dims, config), dtype, config.device)
            onnx_path = export_onnx(spec, module, feed, staging / "onnx").model
            if amax is not None:
                from fluxtrt.quant.qdq import quantize_onnx

                say(name, f"inserting {config.precision} Q/DQ")
                quantize_onnx(onnx_path, amax, config.precision)
        say(name, f"building {backend.name} engine")
        engine_path = staging / "engine" / f"{name}{backend.extension}"
        # A backend without ONNX quantizes the module itself; the names get the wrapper's attribute in front.
        module_amax = None if amax is None or backend.uses_onnx else {f"transformer.{k}": v for k, v in amax.items()}
        job = BuildJob(spec, module, onnx_path, engine_path, config.precision, profile, config.device,
                       staging / "work", options=config.backend_options(), amax=module_amax)  # fmt: skip
        job.workdir.mkdir()
        with torch.inference_mode():
            backend.build(job)
        if not engine_path.is_file():
            raise EngineError(f"{name}: the {backend.name} backend reported success but wrote no {engine_path.name}")
        # Move into place: ONNX folder first (swapping the directory), then extras, the engine file last.
        onnx_records = []
        if onnx_path is not None:
            final_onnx = out / "onnx" / name
            _replace_dir(staging / "onnx", final_onnx)
            onnx_records = [FileRecord.of(out, p) for p in sorted(final_onnx.iterdir())]
        extras = []
        for f in sorted((staging / "engine").iterdir()):
            if f != engine_path:
                os.replace(f, out / f.name)
                extras.append(FileRecord.of(out, out / f.name))
        final_engine = out / engine_path.name
        os.replace(engine_path, final_engine)
        return ComponentEntry(
            settings=settings,
            onnx=onnx_records,
            engine=FileRecord.of(out, final_engine),
            profile={k: [list(s) for s in v] for k, v in profile.items()},
            build_s=time.perf_counter() - t0,
            options=job.options,
            engine_extra=extras,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sample_dims(name: str, dims: FluxDims, config: BuildConfig) -> dict[str, int]:
    """Export-time sizes: batch 2 and a non-square target, so no dynamic axis is 1 or tied to another."""
    lo = config.min_resolution
    step = dims.multiple_of
    target = Resolution(lo.width + step, lo.height + 2 * step)
    return component_dims(name, dims, 2, target, lo)


def _replace_dir(new: Path, final: Path) -> None:
    """Swap directory ``new`` in at ``final``; an old one is renamed away first and deleted after."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f"{STAGING_PREFIX}old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _previous_manifest(out: Path, config: BuildConfig, backend: EngineBackend) -> Manifest | None:
    """The manifest already in ``out``, if it is one this build may extend.

    Raises:
        EngineError: ``out`` holds engines of another backend or precision, or an unreadable manifest, and
            ``--force`` was not given (nothing is deleted).
    """
    if not (out / "manifest.json").exists():
        occupied = out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir())
        if occupied and not config.force:
            raise EngineError(
                f"--out '{out}' is not empty and has no manifest.json: pick an empty or new directory, or pass "
                "--force to build into it anyway"
            )
        return None
    try:
        previous = Manifest.load(out)
    except EngineError as exc:
        if config.force:
            return None
        raise EngineError(f"{exc} (or pass --force to rebuild everything there)") from None
    if (previous.backend, previous.precision) != (backend.name, config.precision) and not config.force:
        raise EngineError(
            f"--out '{out}' holds {previous.backend} {previous.precision} engines, this build is {backend.name} "
            f"{config.precision}: use another --out, or pass --force to replace them"
        )
    if (previous.backend, previous.precision) != (backend.name, config.precision):
        return None
    return previous


def _remove_leftovers(out: Path) -> None:
    """Delete staging directories of builds that were killed (they never carry a finished file's name)."""
    if out.is_dir():
        for p in out.iterdir():
            if p.name.startswith(STAGING_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def _up_to_date(entry: ComponentEntry, settings: dict, out: Path, name: str) -> bool:
    """Same settings, and every recorded file present with its recorded size and hash."""
    from fluxtrt.engines.manifest import settings_hash, sha256_file

    if entry.settings_hash != settings_hash(settings):
        return False
    for record in [*entry.onnx, entry.engine, *entry.engine_extra]:
        path = out / record.path
        if not path.is_file() or path.stat().st_size != record.bytes or sha256_file(path) != record.sha256:
            return False
    return True


def _bytes(records: list[FileRecord]) -> int:
    return sum(r.bytes for r in records)


def _module(name: str, components: Any) -> Any:
    from fluxtrt.backends.torch_modules import component_module

    return component_module(name, components)


def _build_env(device: str) -> dict:
    import torch

    env = {"torch": torch.__version__, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm=f"{props.major}{props.minor}")
    return env


def _save_tokenizers(components: Any, out: Path) -> None:
    """Write both tokenizers beside the engines, each folder swapped in whole."""
    for folder, tokenizer in (("tokenizer", components.tokenizer), ("tokenizer_2", components.tokenizer_2)):
        staging = out / f"{STAGING_PREFIX}{folder}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer.save_pretrained(str(staging))
        _replace_dir(staging, out / folder)
