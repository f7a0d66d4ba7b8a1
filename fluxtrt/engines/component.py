"""One component built for an engines directory: exported (if the backend reads ONNX) and compiled in a staging
directory named after the component and the process, then moved into place, the engine file last."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxtrt.backends.base import BackendOptions, BuildJob, EngineBackend
from fluxtrt.config import COMPUTE_DTYPE, BuildConfig
from fluxtrt.engines.interrupt import Interrupts
from fluxtrt.engines.manifest import ComponentEntry, FileRecord, Manifest
from fluxtrt.errors import EngineError
from fluxtrt.specs.component import ComponentSpec
from fluxtrt.specs.flux import FluxDims, Resolution, component_dims

STAGING_PREFIX = ".staging-"

Progress = Callable[[str, str], None]  # (component, what is happening)


@dataclass
class BuildContext:
    """What every component of one build shares (in a ``--jobs`` worker: what that worker's builds share)."""

    config: BuildConfig
    backend: EngineBackend
    options: BackendOptions
    components: Any  # FluxKontextComponents (None in the parent of --jobs workers once they take over)
    dims: FluxDims
    specs: dict[str, ComponentSpec]
    manifest: Manifest | None  # None in a --jobs worker: only the parent writes the manifest
    say: Progress
    interrupts: Interrupts

    @property
    def out(self) -> Path:
        return self.config.out


def build_component(build: BuildContext, name: str, settings: dict, profile: dict,
                     amax: dict[str, float] | None) -> ComponentEntry:  # fmt: skip
    """Export (if the backend reads ONNX) and compile one component in a staging directory, then move it in.

    With ``amax`` (calibrated input amax per linear), the exported ONNX gets FP8/NVFP4 Q/DQ before the build, or,
    for a backend that reads no ONNX, the job carries the scales (``BuildJob.amax``).

    Args:
        build: the build; its model, backend, options and progress callback are used, not its manifest.
        name: the component.
        settings, profile: as planned (``fluxtrt.engines.build.plan_component``).
        amax: the calibrated scales of the linears the component computes (and its attentions' V amax), or None.

    Returns:
        The manifest entry of the component, whose files are in place; the caller records it.

    Raises:
        FluxtrtError: export, import (``--onnx-dir``) or build failure; the staging directory is removed.
        KeyboardInterrupt: Ctrl-C, also one swallowed during the backend's build.
    """
    import torch

    from fluxtrt.backends.torch_modules import component_module

    t0 = time.perf_counter()
    staging = build.out / f"{STAGING_PREFIX}{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "onnx").mkdir(parents=True)
        (staging / "engine").mkdir()
        module = component_module(name, build.components)
        onnx_path = _onnx_for(build, name, module, staging / "onnx", amax) if build.backend.uses_onnx else None
        build.say(name, f"building {build.backend.name} engine")
        engine_path = staging / "engine" / f"{name}{build.backend.extension}"
        # A backend without ONNX quantizes the module itself; the names get the wrapper's attribute in front.
        module_amax = (
            None if amax is None or onnx_path is not None else {f"transformer.{k}": v for k, v in amax.items()}
        )
        job = BuildJob(build.specs[name], module, onnx_path, engine_path, build.config.precision, profile,
                       build.config.device, staging / "work", build.options, module_amax,
                       say=lambda message: build.say(name, message))  # fmt: skip
        job.workdir.mkdir()
        with torch.inference_mode():
            record = build.backend.build(job)
        build.interrupts.check()  # a Ctrl-C swallowed during the build: stop before the component counts as built
        if build.backend.writes_engine and not engine_path.is_file():
            raise EngineError(
                f"{name}: the {build.backend.name} backend reported success but wrote no {engine_path.name}"
            )
        onnx_records, engine, extras = _move_into_place(build.out, name, staging, onnx_path, engine_path)
        return ComponentEntry(
            settings=settings,
            onnx=onnx_records,
            engine=engine,
            profile={k: [list(s) for s in v] for k, v in profile.items()},
            build_s=time.perf_counter() - t0,
            record=record,
            engine_extra=extras,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _onnx_for(build: BuildContext, name: str, module: Any, folder: Path, amax: dict[str, float] | None) -> Path:
    """The component's ONNX in ``folder``: imported from ``--onnx-dir``, or exported (and Q/DQ-quantized)."""
    config, spec = build.config, build.specs[name]
    if config.onnx_dir is not None:
        from fluxtrt.export.onnx_dir import import_onnx

        build.say(name, f"using ONNX from {config.onnx_dir}")
        return import_onnx(spec, config.onnx_dir, folder)
    from fluxtrt.export.onnx import export_onnx
    from fluxtrt.models.loading import torch_dtype

    feed = spec.sample_feed(_sample_dims(name, build.dims, config), torch_dtype(COMPUTE_DTYPE[config.precision]),
                            config.device)  # fmt: skip

    def progress(phase: str, seconds: float) -> None:
        build.say(name, f"ONNX {phase} done in {seconds:.1f} s")

    if amax is None:
        build.say(name, "exporting ONNX")
        return export_onnx(spec, module, feed, folder, progress=progress).model
    from fluxtrt.kernels.attention_scales import split_calibration
    from fluxtrt.quant.qdq import quantize_model

    linears = split_calibration(amax)[0]  # the ONNX attention stays BF16: V's amax has no use there
    build.say(name, f"exporting ONNX with {config.precision} Q/DQ")
    return export_onnx(spec, module, feed, folder,
                       rewrite=lambda model: quantize_model(model, linears, config.precision),
                       checker=config.precision == "fp8", progress=progress).model  # fmt: skip


def _move_into_place(out: Path, name: str, staging: Path, onnx_path: Path | None,
                     engine_path: Path) -> tuple[list[FileRecord], FileRecord, list[FileRecord]]:  # fmt: skip
    """ONNX folder first (swapping the directory), then the engine's extra files, the engine file last."""
    onnx_records = []
    if onnx_path is not None:
        final_onnx = out / "onnx" / name
        replace_dir(staging / "onnx", final_onnx)
        onnx_records = [FileRecord.of(out, p) for p in sorted(final_onnx.iterdir())]
    extras = []
    for f in sorted((staging / "engine").iterdir()):
        if f != engine_path:
            os.replace(f, out / f.name)
            extras.append(FileRecord.of(out, out / f.name))
    if not engine_path.is_file():  # a backend that writes no engine: the ONNX is what the directory holds
        return onnx_records, onnx_records[0], extras
    final_engine = out / engine_path.name
    os.replace(engine_path, final_engine)
    return onnx_records, FileRecord.of(out, final_engine), extras


def _sample_dims(name: str, dims: FluxDims, config: BuildConfig) -> dict[str, int]:
    """Export-time sizes: batch 2 and a non-square target, so no dynamic axis is 1 or tied to another."""
    lo = config.min_resolution
    step = dims.multiple_of
    target = Resolution(lo.width + step, lo.height + 2 * step)
    return component_dims(name, dims, 2, target, lo)


def replace_dir(new: Path, final: Path) -> None:
    """Swap directory ``new`` in at ``final``; an old one is renamed away first and deleted after."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f"{STAGING_PREFIX}old-{final.name}-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(out: Path) -> None:
    """Delete the staging directories in ``out`` (left by builds or workers that were killed; they never carry a
    finished file's name). Only while no build of ``out`` runs: under its lock, before or after the builds."""
    if out.is_dir():
        for p in out.iterdir():
            if p.name.startswith(STAGING_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
