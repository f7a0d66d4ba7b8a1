"""One component's part of a build, shared by the build process and its ``--jobs`` workers: the model loaded for
it, its plan (settings, profile, calibration, whether it is up to date) and the result recorded in the manifest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxtrt import __version__
from fluxtrt.config import COMPUTE_DTYPE, QUANTIZED_PRECISIONS, BuildConfig
from fluxtrt.engines.component import BuildContext
from fluxtrt.engines.manifest import ComponentEntry, FileRecord, settings_hash, sha256_file
from fluxtrt.specs.flux import TRANSFORMERS, profile_shapes


@dataclass
class ComponentResult:
    """What happened to one component in this build."""

    name: str
    status: str  # "built" or "up to date"
    seconds: float
    onnx_bytes: int
    engine_bytes: int


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
        "model": manifest.model.fingerprint,
        "profile": {k: [list(s) for s in v] for k, v in profile.items()},
        "fluxtrt": __version__,
        "options": build.options.to_dict(),
    }
    amax = None
    # Backends that read ONNX take an imported --onnx-dir as it is (already quantized or not).
    imported = build.backend.uses_onnx and config.onnx_dir is not None
    if name in TRANSFORMERS and config.precision in QUANTIZED_PRECISIONS and not imported:
        from fluxtrt.backends.torch_modules import part_owns_linear
        from fluxtrt.engines.calibrate import calibration_for_build

        build.say(name, "calibrating (or reusing saved scales)")
        path, calibration = calibration_for_build(config, build.components, manifest.model.fingerprint, build.out)
        # The linears it computes, and its attentions' V amax.
        amax = {k: v for k, v in calibration.scales().items() if part_owns_linear(name, k)}
        manifest.calibration = str(path.relative_to(build.out))
        settings["calibration"] = sha256_file(path)
    entry = manifest.components.get(name)
    up_to_date = not config.force and entry is not None and _up_to_date(entry, settings, build.out)
    return Plan(name, settings, profile, amax, up_to_date)


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
