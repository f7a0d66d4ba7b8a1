"""``fluxtrt build``: checkpoint -> (calibration) -> ONNX per component -> engine per component -> manifest, atomically.

Each component is exported and compiled in a staging directory and moved into place only when complete
(``fluxtrt.engines.component``); the manifest is rewritten after every component, so an interrupted build keeps what
it finished and leaves nothing that looks finished but is not. A component is skipped when its recorded settings
hash and files still match.

With ``jobs`` > 1 the components are built at once in worker processes (``fluxtrt.engines.jobs``): this process
plans every component (settings, calibration, the up-to-date check), each worker loads its own copy of the model and
builds what it is handed, and this process alone writes the manifest, as each build comes back.
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
from fluxtrt.backends.base import BackendOptions, EngineBackend, get_backend
from fluxtrt.config import COMPUTE_DTYPE, QUANTIZED_PRECISIONS, BuildConfig
from fluxtrt.engines.component import (
    STAGING_PREFIX,
    BuildContext,
    Progress,
    build_component,
    remove_leftovers,
    replace_dir,
)
from fluxtrt.engines.interrupt import Interrupts, watch_interrupts
from fluxtrt.engines.lock import build_lock
from fluxtrt.engines.manifest import ComponentEntry, FileRecord, Manifest, settings_hash, sha256_file
from fluxtrt.environment import check_device, device_environment
from fluxtrt.errors import EngineError, InputError
from fluxtrt.specs.flux import TRANSFORMERS, FluxDims, profile_shapes


@dataclass
class ComponentResult:
    """What happened to one component in this build."""

    name: str
    status: str  # "built" or "up to date"; the calibration's row: "computed", "reused" or "given"
    seconds: float
    onnx_bytes: int
    engine_bytes: int


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

    With ``config.jobs`` > 1, the components that need building are built at once in that many worker processes
    (spawned; each loads its own copy of the model), the transformer first; ``on_progress`` is still called in this
    process, for their steps too.

    Args:
        config: what to build.
        on_progress: called with (component, message) as work starts on each step.
        backend: use this backend object instead of looking ``config.backend`` up (for embedding and tests). With
            ``config.jobs`` > 1 it is pickled to the workers, so it must pickle (its class importable by name);
            without it the workers look ``config.backend`` up themselves.

    Returns:
        The report; ``config.out/manifest.json`` describes every component built so far.

    Raises:
        FluxtrtError: unavailable backend or device, an option the backend does not have, an out directory holding
            other engines or being built by another build (``DIR/.lock``), export or build failure. Completed
            components stay recorded and usable. With ``config.jobs`` > 1: the first failure in ``config.components``
            order, once the builds under way have ended (those that succeed are recorded); InputError for a
            ``backend`` that does not pickle.
        KeyboardInterrupt: Ctrl-C, at once or, where Python swallowed it, at the next step. Completed components
            stay recorded and usable; nothing half-written is left.
    """
    given = backend
    backend = backend or get_backend(config.backend)
    if config.jobs > 1 and given is not None:
        from fluxtrt.engines.jobs import check_picklable

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
    from fluxtrt.pipeline.fit import excluded_preferred

    notice = excluded_preferred(config.min_resolution, config.max_resolution)
    return [notice] if notice else []


def _build_locked(config: BuildConfig, backend: EngineBackend, options: BackendOptions, say: Progress,
                  interrupts: Interrupts, given: EngineBackend | None) -> BuildReport:  # fmt: skip
    """``build_engines`` once it holds the directory's lock (``given``: the backend object the caller passed)."""
    from fluxtrt.specs.flux import component_specs, dims_from_components

    previous = _previous_manifest(config.out, config, backend)
    remove_leftovers(config.out)

    components = load_model(config, lambda message: say("model", message))
    dims = dims_from_components(components)
    manifest = _new_manifest(config, backend, components, dims, previous)
    build = BuildContext(config, backend, options, components, dims, component_specs(dims), manifest, say, interrupts)
    config.out.mkdir(parents=True, exist_ok=True)
    _save_tokenizers(components, config.out)
    manifest.save(config.out)  # from here on a rerun recognises the directory as its own
    calibration = calibrate_once(build)
    if config.jobs == 1:
        results = [_bring_up_to_date(build, name) for name in config.components]
    else:
        from fluxtrt.engines.jobs import build_in_workers

        del components  # build.components is the only reference left: the workers' build lets it go
        results = build_in_workers(build, given)
    manifest.save(config.out)
    return BuildReport(config.out, manifest, results, calibration)


def load_model(config: BuildConfig, say: Callable[[str], None]) -> Any:
    """The model of ``config`` in the build's compute dtype on its device (``FluxKontextComponents``), ``say``
    telling what is loaded.

    Raises:
        ModelLoadError, DeviceError: as ``load_components``.
    """
    from fluxtrt.models import load_components

    vae = f", vae {config.vae}" if config.vae is not None else ""
    say(f"loading {config.model} ({COMPUTE_DTYPE[config.precision]}, {config.device}{vae})")
    return load_components(config.model, config.device, COMPUTE_DTYPE[config.precision], vae=config.vae)


def _new_manifest(config: BuildConfig, backend: EngineBackend, components: Any, dims: FluxDims,
                  previous: Manifest | None) -> Manifest:  # fmt: skip
    """The manifest of this build, keeping the components of ``previous`` (the same backend and precision)."""
    from fluxtrt.models.loading import model_fingerprint

    return Manifest(
        backend=backend.name,
        backend_version=backend.version(),
        precision=config.precision,
        fluxtrt_version=__version__,
        model={
            "source": components.source,
            "fingerprint": model_fingerprint(config.model, vae=config.vae),
            "vae": config.vae,
            "dims": asdict(dims),
            "vae_scaling": components.vae.config.scaling_factor,
            "vae_shift": components.vae.config.shift_factor,
            "scheduler_config": components.scheduler_config,
            "max_sequence_length": components.max_sequence_length,
        },
        build_env=device_environment(config.device),
        resolutions={k: str(getattr(config, f"{k}_resolution")) for k in ("min", "opt", "max")},
        batch={"min": 1, "opt": 1, "max": config.max_batch},
        components=dict(previous.components) if previous else {},
    )


@dataclass
class Plan:
    """One component as decided before its build: the settings it is built with (their hash decides skipping), its
    profile, the calibrated input amax of its linears (a quantized transformer, else None), and whether the entry
    recorded for it still matches."""

    name: str
    settings: dict
    profile: dict
    amax: dict[str, float] | None
    up_to_date: bool


def _bring_up_to_date(build: BuildContext, name: str) -> ComponentResult:
    """Build component ``name`` unless its recorded settings and files match; calibrate a quantized transformer."""
    plan = plan_component(build, name)
    if plan.up_to_date:
        return skipped_result(build, name)
    build.manifest.components.pop(name, None)
    return record_built(build, name, build_component(build, name, plan.settings, plan.profile, plan.amax))


def plan_component(build: BuildContext, name: str) -> Plan:
    """Settings, profile and (fp8/fp4 transformer) calibration of component ``name``, and whether it is up to date.

    Calibration runs here, in the process that holds the manifest and the model, the first time a quantized
    transformer needs it (later ones reuse the saved file); ``manifest.calibration`` is set then.

    Raises:
        InputError, BuildError: a calibration file that does not fit, or a calibration that fails.
    """
    config, manifest = build.config, build.manifest
    profile = profile_shapes(
        build.specs[name],
        build.dims,
        (1, 1, config.max_batch),
        (config.min_resolution, config.opt_resolution, config.max_resolution),
    )
    settings = {
        "component": name,
        "backend": build.backend.name,
        "backend_version": manifest.backend_version,
        "precision": config.precision,
        "model": manifest.model["fingerprint"],
        "profile": {k: [list(s) for s in v] for k, v in profile.items()},
        "fluxtrt": __version__,
        "options": build.options.to_dict(),
    }
    amax = None
    if needs_calibration(build, name):
        from fluxtrt.backends.torch_modules import part_owns_linear
        from fluxtrt.engines.calibrate import calibration_for_build

        # calibrate_once has computed it or checked the given one: this finds it saved.
        path, calibration, _ = calibration_for_build(config, build.components, manifest.model["fingerprint"], build.out)
        # The linears it computes, and its attentions' V amax.
        amax = {k: v for k, v in calibration.scales().items() if part_owns_linear(name, k)}
        manifest.calibration = str(path.relative_to(build.out))
        settings["calibration"] = sha256_file(path)
    entry = manifest.components.get(name)
    up_to_date = not config.force and entry is not None and _up_to_date(entry, settings, build.out)
    return Plan(name, settings, profile, amax, up_to_date)


def needs_calibration(build: BuildContext, name: str) -> bool:
    """Whether component ``name`` is a transformer quantized from a calibration (fp8/fp4, not an imported ONNX)."""
    # Backends that read ONNX take an imported --onnx-dir as it is (already quantized or not).
    imported = build.backend.uses_onnx and build.config.onnx_dir is not None
    return name in TRANSFORMERS and build.config.precision in QUANTIZED_PRECISIONS and not imported


def calibrate_once(build: BuildContext) -> ComponentResult | None:
    """Before any component: the calibration the build's quantized transformers share, computed (its progress told
    as ``calibration``), reused from the directory or the given file; its row of the report, or None where no
    component needs one.

    Raises:
        InputError, BuildError: a calibration file that does not fit, or a calibration that fails.
    """
    if not any(needs_calibration(build, name) for name in build.config.components):
        return None
    from fluxtrt.engines.calibrate import calibration_for_build

    t0 = time.perf_counter()
    say = lambda message: build.say("calibration", message)  # noqa: E731
    say("calibrating the transformer's quantized linears (or finding saved scales)")
    fingerprint = build.manifest.model["fingerprint"]
    _, _, how = calibration_for_build(build.config, build.components, fingerprint, build.out, say)
    return ComponentResult("calibration", how, time.perf_counter() - t0, 0, 0)


def skipped_result(build: BuildContext, name: str) -> ComponentResult:
    """The result of component ``name``, whose recorded entry is up to date (and say so)."""
    entry = build.manifest.components[name]
    build.say(name, "up to date")
    return ComponentResult(name, "up to date", 0.0, _bytes(entry.onnx), entry.engine.bytes)


def record_built(build: BuildContext, name: str, entry: ComponentEntry) -> ComponentResult:
    """Put the entry of the built component ``name`` in the manifest and save it: from now on it counts as built,
    whatever follows. Returns its result."""
    build.manifest.components[name] = entry
    build.manifest.save(build.out)
    return ComponentResult(name, "built", entry.build_s, _bytes(entry.onnx), entry.engine.bytes)


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


def _up_to_date(entry: ComponentEntry, settings: dict, out: Path) -> bool:
    """Same settings, and every recorded file present with its recorded size and hash."""
    if entry.settings_hash != settings_hash(settings):
        return False
    for record in [*entry.onnx, entry.engine, *entry.engine_extra]:
        path = out / record.path
        if not path.is_file() or path.stat().st_size != record.bytes or sha256_file(path) != record.sha256:
            return False
    return True


def _bytes(records: list[FileRecord]) -> int:
    return sum(r.bytes for r in records)


def _save_tokenizers(components: Any, out: Path) -> None:
    """Write both tokenizers beside the engines, each folder swapped in whole."""
    for folder, tokenizer in (("tokenizer", components.tokenizer), ("tokenizer_2", components.tokenizer_2)):
        staging = out / f"{STAGING_PREFIX}{folder}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer.save_pretrained(str(staging))
        replace_dir(staging, out / folder)
