"""One component's part of a build, shared by the build process and its ``--jobs`` workers: the model loaded for
it (in a worker, only the parts it builds; in the build process, the whole model, and only once something needs
it), its plan (settings, profile, calibration, whether it is up to date) and the result recorded in the manifest."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxtrt import __version__
from fluxtrt.config import COMPUTE_DTYPE, QUANTIZED_PRECISIONS, BuildConfig
from fluxtrt.engines.component import BuildContext, build_component
from fluxtrt.engines.manifest import ComponentEntry, FileRecord, settings_hash, sha256_file
from fluxtrt.specs.flux import TRANSFORMERS, profile_shapes


@dataclass
class ComponentResult:
    """What happened to one component in this build."""

    name: str
    status: str  # "built" or "up to date"; the calibration's row: "computed", "reused" or "given"
    seconds: float
    onnx_bytes: int
    engine_bytes: int


# The model parts (``fluxtrt.models.components.PARTS``) each component is built from.
COMPONENT_PARTS = {
    "clip": ("text_encoder",),
    "t5": ("text_encoder_2",),
    "vae_encoder": ("vae",),
    "vae_decoder": ("vae",),
    **{name: ("transformer",) for name in TRANSFORMERS},
}


def load_model(config: BuildConfig, say: Callable[[str], None], parts: tuple[str, ...] | None = None) -> Any:
    """The model of ``config`` (only ``parts`` of it, if given) in the build's compute dtype on its device
    (``FluxKontextComponents``), ``say`` telling what is loaded.

    Raises:
        ModelLoadError, DeviceError: as ``load_components``.
    """
    from fluxtrt.models import load_components

    vae = f", vae {config.vae}" if config.vae is not None else ""
    which = f"{', '.join(parts)} of " if parts is not None else ""
    say(f"loading {which}{config.model} ({COMPUTE_DTYPE[config.precision]}, {config.device}{vae})")
    return load_components(config.model, config.device, COMPUTE_DTYPE[config.precision], vae=config.vae, parts=parts)


def ensure_model(build: BuildContext) -> Any:
    """The build process's whole model, loaded the first time something needs it (a build, a calibration)."""
    if build.components is None:
        build.components = load_model(build.config, lambda message: build.say("model", message))
    return build.components


class _OnDemand:
    """Stands for the build's model where it may not be needed (a saved calibration that fits): loads it on the
    first attribute read."""

    def __init__(self, build: BuildContext):
        self._build = build

    def __getattr__(self, name: str) -> Any:
        return getattr(ensure_model(self._build), name)


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


def plan_component(build: BuildContext, name: str) -> Plan:
    """Settings, profile and (fp8/fp4 transformer) calibration of component ``name``, and whether it is up to date.

    The calibration is read here, in the process that holds the manifest and the model (``calibrate_once`` computed
    it before; without that, the first quantized transformer computes it); ``manifest.calibration`` is set then.

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
        "model": manifest.model.fingerprint,
        "profile": {k: [list(s) for s in v] for k, v in profile.items()},
        "fluxtrt": __version__,
        "options": build.options.to_dict(),
    }
    amax = None
    if needs_calibration(build, name):
        from fluxtrt.backends.torch_modules import part_owns_linear
        from fluxtrt.engines.calibrate import calibration_for_build

        # calibrate_once has computed it or checked the given one: this finds it saved.
        model = _OnDemand(build)  # loaded only if no saved calibration fits
        path, calibration, _ = calibration_for_build(config, model, manifest.model.fingerprint, build.out)
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
    as ``calibration``; the model loaded for it), reused from the directory or the given file; its row of the
    report, or None where no component needs one.

    Raises:
        InputError, BuildError: a calibration file that does not fit, or a calibration that fails.
    """
    if not any(needs_calibration(build, name) for name in build.config.components):
        return None
    from fluxtrt.engines.calibrate import calibration_for_build

    t0 = time.perf_counter()
    say = lambda message: build.say("calibration", message)  # noqa: E731
    say("calibrating the transformer's quantized linears (or finding saved scales)")
    fingerprint = build.manifest.model.fingerprint
    _, _, how = calibration_for_build(build.config, _OnDemand(build), fingerprint, build.out, say)
    return ComponentResult("calibration", how, time.perf_counter() - t0, 0, 0)


def skipped_result(build: BuildContext, name: str) -> ComponentResult:
    """The result of component ``name``, whose recorded entry is up to date (and say so)."""
    entry = build.manifest.components[name]
    build.say(name, "up to date")
    return ComponentResult(name, "up to date", 0.0, _bytes(entry.onnx), entry.engine.bytes)


def build_planned(build: BuildContext, plan: Plan) -> ComponentEntry:
    """Build ``plan``'s component in this process, from the model it holds (``build.components``), its recorded
    entry dropped first (the manifest saved next does not claim it while its files are being replaced); the caller
    records the entry it returns (``record_built``)."""
    build.manifest.components.pop(plan.name, None)
    return build_component(build, plan.name, plan.settings, plan.profile, plan.amax)


def record_built(build: BuildContext, name: str, entry: ComponentEntry) -> ComponentResult:
    """Put the entry of the built component ``name`` in the manifest and save it: from now on it counts as built,
    whatever follows. Returns its result."""
    build.manifest.components[name] = entry
    build.manifest.save(build.out)
    return ComponentResult(name, "built", entry.build_s, _bytes(entry.onnx), entry.engine.bytes)


def _up_to_date(entry: ComponentEntry, settings: dict, out: Path) -> bool:
    """Same settings, and every recorded file present with its recorded size and hash. A file whose size and
    modification time are those recorded is taken as unchanged without reading it (a transformer engine is tens of
    GB); one with another mtime, or none recorded, is hashed."""
    if entry.settings_hash != settings_hash(settings):
        return False
    for record in [*entry.onnx, entry.engine, *entry.engine_extra]:
        path = out / record.path
        if not path.is_file():
            return False
        stat = path.stat()
        if stat.st_size != record.bytes:
            return False
        if record.mtime is None or stat.st_mtime != record.mtime:
            if sha256_file(path) != record.sha256:
                return False
            record.mtime = stat.st_mtime  # the same content: the next check needs no hashing (saved with the manifest)
    return True


def _bytes(records: list[FileRecord]) -> int:
    return sum(r.bytes for r in records)
