"""``fluxtrt build``: checkpoint -> (calibration) -> ONNX per component -> engine per component -> manifest, atomically.

Each component is exported and compiled in a staging directory and moved into place only when complete
(``fluxtrt.engines.component``); the manifest is rewritten after every component, so an interrupted build keeps what
it finished and leaves nothing that looks finished but is not. A component is skipped when its recorded settings
hash and files still match.

The model is loaded only when something needs it: a rerun whose components are all up to date reads what it needs
(dimensions, VAE factors, scheduler config) from the manifest and loads nothing.

With ``jobs`` other than 1 (``auto``, the default, picks it from the memory free and each component's footprint,
``fluxtrt.engines.fit``) the components are built at once in worker processes (``fluxtrt.engines.jobs``): this
process plans every component (settings, calibration, the up-to-date check), each worker loads only the parts of the
model the component it builds needs, and this process alone writes the manifest, as each build comes back.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxtrt import __version__
from fluxtrt.backends.base import BackendOptions, EngineBackend, get_backend
from fluxtrt.config import BuildConfig
from fluxtrt.engines.component import (
    STAGING_PREFIX,
    BuildContext,
    Progress,
    remove_leftovers,
    replace_dir,
)
from fluxtrt.engines.interrupt import Interrupts, watch_interrupts
from fluxtrt.engines.jobs import build_in_workers
from fluxtrt.engines.lock import build_lock
from fluxtrt.engines.manifest import BatchRange, Manifest, ModelInfo, ResolutionRange
from fluxtrt.engines.plan import (
    ComponentResult,
    build_planned,
    calibrate_once,
    ensure_model,
    load_model,
    plan_component,
    record_built,
    skipped_result,
)
from fluxtrt.engines.worker import check_picklable
from fluxtrt.environment import check_device, device_environment
from fluxtrt.errors import EngineError, InputError


@dataclass
class BuildReport:
    """The finished build: the manifest written and what each component did."""

    out: Path
    manifest: Manifest
    results: list[ComponentResult]
    calibration: ComponentResult | None = None  # a quantized build's calibration: computed, reused or given


def build_engines(
    config: BuildConfig, on_progress: Progress | None = None, backend: EngineBackend | None = None
) -> BuildReport:
    """Build (or bring up to date) the engines directory ``config.out``.

    With ``config.jobs`` other than 1, the components that need building are built at once in worker processes
    (spawned; each loads only the parts of the model its component needs), the transformer first; ``on_progress``
    is still called in this process, for their steps too.

    Args:
        config: what to build.
        on_progress: called with (component, message) as work starts on each step.
        backend: use this backend object instead of looking ``config.backend`` up (for embedding and tests). With
            ``config.jobs`` other than 1 it is pickled to the workers, so it must pickle (its class importable by name);
            without it the workers look ``config.backend`` up themselves.

    Returns:
        The report; ``config.out/manifest.json`` describes every component built so far.

    Raises:
        FluxtrtError: unavailable backend or device, an option the backend does not have, an out directory holding
            other engines or being built by another build (``DIR/.lock``), export or build failure. Completed
            components stay recorded and usable. With ``config.jobs`` other than 1: the first failure in
            ``config.components`` order, once the builds under way have ended (those that succeed are recorded), as
            one line; InputError for a ``backend`` that does not pickle; DeviceError for a ``--jobs`` whose
            components would not fit the memory free at once.
        KeyboardInterrupt: Ctrl-C, at once or, where Python swallowed it, at the next step. Completed components
            stay recorded and usable; nothing half-written is left.
    """
    given = backend
    backend = backend or get_backend(config.backend)
    if config.jobs != 1 and given is not None:
        check_picklable(given, config)
    backend.check_buildable()
    if config.precision not in backend.precisions:
        raise InputError(
            f"--precision is '{config.precision}' but the {backend.name} backend builds "
            f"{', '.join(backend.precisions)}: pick one of those"
        )
    options = backend.options(config.backend_options())
    backend.check_build(config.precision, options)
    check_device(config.device)
    with watch_interrupts() as interrupts:
        tell = on_progress or (lambda component, message: None)

        def say(component: str, message: str) -> None:
            interrupts.check()
            tell(component, message)

        with build_lock(config.out, say):
            return _build_locked(config, backend, options, say, interrupts, given)


def range_notices(config: BuildConfig) -> list[str]:
    """What the user should know about the resolution range of ``config`` before building: a notice when it leaves
    out preferred Kontext sizes (an edit at one of them is then made at a size inside the range)."""
    from fluxtrt.pipeline.sizes import excluded_preferred

    notice = excluded_preferred(config.min_resolution, config.max_resolution)
    return [notice] if notice else []


def _build_locked(config: BuildConfig, backend: EngineBackend, options: BackendOptions, say: Progress,
                  interrupts: Interrupts, given: EngineBackend | None) -> BuildReport:  # fmt: skip
    """``build_engines`` once it holds the directory's lock (``given``: the backend object the caller passed)."""
    from fluxtrt.models.loading import model_fingerprint
    from fluxtrt.specs.flux import component_specs

    previous = _previous_manifest(config.out, config, backend)
    remove_leftovers(config.out)

    fingerprint = model_fingerprint(config.model, vae=config.vae)
    components = None
    model = _recorded_model(previous, fingerprint, config.out)
    if model is None:  # a new directory or another model: read it off the model itself
        components = load_model(config, lambda message: say("model", message))
        model = _model_record(components, fingerprint, config.vae)
    dims = model.dims
    manifest = _new_manifest(config, backend, model, previous)
    build = BuildContext(config, backend, options, components, dims, component_specs(dims), manifest, say, interrupts)
    config.out.mkdir(parents=True, exist_ok=True)
    if components is not None:
        _save_tokenizers(components, config.out)
    manifest.save(config.out)  # from here on a rerun recognises the directory as its own
    calibration = calibrate_once(build)
    if config.jobs == 1:
        results = [_bring_up_to_date(build, name) for name in config.components]
    else:
        del components  # build.components is the only reference left: the workers' build lets it go
        results = build_in_workers(build, given)
    manifest.save(config.out)
    return BuildReport(config.out, manifest, results, calibration)


def _recorded_model(previous: Manifest | None, fingerprint: str, out: Path) -> ModelInfo | None:
    """What ``previous`` recorded of the model, where it is this model (same fingerprint) and its tokenizers are
    in ``out``; None where the model must be loaded to know."""
    if previous is None or previous.model.fingerprint != fingerprint:
        return None
    if not all((out / folder).is_dir() for folder in ("tokenizer", "tokenizer_2")):
        return None
    return previous.model


def _model_record(components: Any, fingerprint: str, vae: str | None) -> ModelInfo:
    """What the manifest records of the loaded model."""
    from fluxtrt.specs.flux import dims_from_components

    return ModelInfo(
        source=components.source,
        fingerprint=fingerprint,
        vae=vae,
        dims=dims_from_components(components),
        vae_scaling=components.vae.config.scaling_factor,
        vae_shift=components.vae.config.shift_factor,
        scheduler_config=components.scheduler_config,
        max_sequence_length=components.max_sequence_length,
    )


def _new_manifest(config: BuildConfig, backend: EngineBackend, model: ModelInfo,
                  previous: Manifest | None) -> Manifest:  # fmt: skip
    """The manifest of this build, keeping the components of ``previous`` (the same backend and precision)."""
    return Manifest(
        backend=backend.name,
        backend_version=backend.version(),
        precision=config.precision,
        fluxtrt_version=__version__,
        model=model,
        build_env=device_environment(config.device),
        resolutions=ResolutionRange(config.min_resolution, config.opt_resolution, config.max_resolution),
        batch=BatchRange(1, 1, config.max_batch),
        components=dict(previous.components) if previous else {},
    )


def _bring_up_to_date(build: BuildContext, name: str) -> ComponentResult:
    """Build component ``name`` unless its recorded settings and files match; calibrate a quantized transformer."""
    plan = plan_component(build, name)
    if plan.up_to_date:
        return skipped_result(build, name)
    ensure_model(build)
    return record_built(build, name, build_planned(build, plan))


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


def _save_tokenizers(components: Any, out: Path) -> None:
    """Write both tokenizers beside the engines, each folder swapped in whole."""
    for folder, tokenizer in (("tokenizer", components.tokenizer), ("tokenizer_2", components.tokenizer_2)):
        staging = out / f"{STAGING_PREFIX}{folder}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer.save_pretrained(str(staging))
        replace_dir(staging, out / folder)
