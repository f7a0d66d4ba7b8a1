"""``fluxtrt build``: checkpoint -> (calibration) -> ONNX per component -> engine per component -> manifest, atomically.

Each component is exported and compiled in a staging directory and moved into place only when complete; the
manifest is rewritten after every component, so an interrupted build keeps what it finished and leaves nothing
that looks finished but is not. A component is skipped when its recorded settings hash and files still match.

With ``jobs`` > 1 the components are built at once in worker processes (``_build_in_workers``): this process plans
every component (settings, calibration, the up-to-date check), each worker loads its own copy of the model and
builds what it is handed, and this process alone writes the manifest, as each build comes back.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fluxtrt import __version__
from fluxtrt.backends.base import BackendOptions, BuildJob, EngineBackend, get_backend
from fluxtrt.config import COMPUTE_DTYPE, QUANTIZED_PRECISIONS, BuildConfig
from fluxtrt.engines.interrupt import Interrupts, watch_interrupts
from fluxtrt.engines.lock import build_lock
from fluxtrt.engines.manifest import ComponentEntry, FileRecord, Manifest, settings_hash, sha256_file
from fluxtrt.environment import check_device, device_environment
from fluxtrt.errors import BuildError, EngineError, InputError, first_line
from fluxtrt.specs.component import ComponentSpec
from fluxtrt.specs.flux import TRANSFORMERS, FluxDims, Resolution, component_dims, profile_shapes

STAGING_PREFIX = ".staging-"

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


@dataclass
class _Build:
    """What every component of one build shares."""

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
        _check_picklable(given, config)
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


def _build_locked(config: BuildConfig, backend: EngineBackend, options: BackendOptions, say: Progress,
                  interrupts: Interrupts, given: EngineBackend | None) -> BuildReport:  # fmt: skip
    """``build_engines`` once it holds the directory's lock (``given``: the backend object the caller passed)."""
    from fluxtrt.specs.flux import component_specs, dims_from_components

    previous = _previous_manifest(config.out, config, backend)
    _remove_leftovers(config.out)

    components = _load_model(config, lambda message: say("model", message))
    dims = dims_from_components(components)
    manifest = _new_manifest(config, backend, components, dims, previous)
    build = _Build(config, backend, options, components, dims, component_specs(dims), manifest, say, interrupts)
    config.out.mkdir(parents=True, exist_ok=True)
    _save_tokenizers(components, config.out)
    manifest.save(config.out)  # from here on a rerun recognises the directory as its own
    if config.jobs == 1:
        results = [_bring_up_to_date(build, name) for name in config.components]
    else:
        del components  # build.components is the only reference left: the workers' build lets it go
        results = _build_in_workers(build, given)
    manifest.save(config.out)
    return BuildReport(config.out, manifest, results)


def _load_model(config: BuildConfig, say: Callable[[str], None]) -> Any:
    """The model in the build's compute dtype on its device (``FluxKontextComponents``)."""
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
class _Plan:
    """One component as decided before its build: the settings it is built with (their hash decides skipping), its
    profile, the calibrated input amax of its linears (a quantized transformer, else None), and whether the entry
    recorded for it still matches."""

    name: str
    settings: dict
    profile: dict
    amax: dict[str, float] | None
    up_to_date: bool


def _bring_up_to_date(build: _Build, name: str) -> ComponentResult:
    """Build component ``name`` unless its recorded settings and files match; calibrate a quantized transformer."""
    plan = _plan(build, name)
    if plan.up_to_date:
        return _skipped(build, name)
    build.manifest.components.pop(name, None)
    return _record(build, name, _build_component(build, name, plan.settings, plan.profile, plan.amax))


def _plan(build: _Build, name: str) -> _Plan:
    """Settings, profile and (fp8/fp4 transformer) calibration of component ``name``, and whether it is up to date.

    Calibration runs here, in the process that holds the manifest, the first time a quantized transformer needs it
    (later ones reuse the saved file); ``manifest.calibration`` is set then.
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
    # Backends that read ONNX take an imported --onnx-dir as it is (already quantized or not).
    imported = build.backend.uses_onnx and config.onnx_dir is not None
    if name in TRANSFORMERS and config.precision in QUANTIZED_PRECISIONS and not imported:
        from fluxtrt.backends.torch_modules import part_owns_linear
        from fluxtrt.engines.calibrate import calibration_for_build

        build.say(name, "calibrating (or reusing saved scales)")
        path, calibration = calibration_for_build(config, build.components, manifest.model["fingerprint"], build.out)
        amax = {k: v for k, v in calibration.amax.items() if part_owns_linear(name, k)}  # the linears it computes
        manifest.calibration = str(path.relative_to(build.out))
        settings["calibration"] = sha256_file(path)
    entry = manifest.components.get(name)
    up_to_date = not config.force and entry is not None and _up_to_date(entry, settings, build.out)
    return _Plan(name, settings, profile, amax, up_to_date)


def _skipped(build: _Build, name: str) -> ComponentResult:
    """The result of a component whose recorded entry is up to date."""
    entry = build.manifest.components[name]
    build.say(name, "up to date")
    return ComponentResult(name, "up to date", 0.0, _bytes(entry.onnx), entry.engine.bytes)


def _record(build: _Build, name: str, entry: ComponentEntry) -> ComponentResult:
    """Put the built component in the manifest and save it: from now on it counts as built, whatever follows."""
    build.manifest.components[name] = entry
    build.manifest.save(build.out)
    return ComponentResult(name, "built", entry.build_s, _bytes(entry.onnx), entry.engine.bytes)


def _build_component(build: _Build, name: str, settings: dict, profile: dict,
                     amax: dict[str, float] | None) -> ComponentEntry:  # fmt: skip
    """Export (if the backend reads ONNX) and compile one component in a staging directory, then move it in.

    With ``amax`` (calibrated input amax per linear), the exported ONNX gets FP8/NVFP4 Q/DQ before the build, or,
    for a backend that reads no ONNX, the job carries the scales (``BuildJob.amax``).
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
                       build.config.device, staging / "work", build.options, module_amax)  # fmt: skip
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


def _onnx_for(build: _Build, name: str, module: Any, folder: Path, amax: dict[str, float] | None) -> Path:
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
    from fluxtrt.quant.qdq import quantize_model

    build.say(name, f"exporting ONNX with {config.precision} Q/DQ")
    return export_onnx(spec, module, feed, folder, rewrite=lambda model: quantize_model(model, amax, config.precision),
                       checker=config.precision == "fp8", progress=progress).model  # fmt: skip


def _move_into_place(out: Path, name: str, staging: Path, onnx_path: Path | None,
                     engine_path: Path) -> tuple[list[FileRecord], FileRecord, list[FileRecord]]:  # fmt: skip
    """ONNX folder first (swapping the directory), then the engine's extra files, the engine file last."""
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
        _replace_dir(staging, out / folder)


# --- jobs > 1: components built at once in worker processes ----------------------------------------------------------

# Seconds the parent waits for a worker's message before it looks at the builds again.
POLL_S = 0.2

# Set in each worker process: the queue its progress goes to the parent on, and the model it loaded (once, for every
# component it builds).
_to_parent: Any = None
_worker_model: tuple[tuple, Any] | None = None


def _build_in_workers(build: _Build, given: EngineBackend | None) -> list[ComponentResult]:
    """Plan every component here, then build those out of date in ``build.config.jobs`` worker processes.

    Calibration (in ``_plan``) runs here, before any worker starts, so its file is written once. This process then
    lets its copy of the model go, so the workers' copies are all there is. The transformer (or its parts) starts
    first: it takes longest, and the others are built beside it.

    Args:
        build: the build, its model loaded and its manifest saved.
        given: the backend object the caller passed (pickled to the workers), or None (they look it up by name).

    Returns:
        The results, in ``config.components`` order.
    """
    config = build.config
    plans = {name: _plan(build, name) for name in config.components}
    results = {name: _skipped(build, name) for name, plan in plans.items() if plan.up_to_date}
    todo = sorted((p for p in plans.values() if not p.up_to_date), key=lambda p: p.name not in TRANSFORMERS)
    if todo:
        _release_model(build)
        results.update(_run_workers(build, todo, given))
        # Listed in --components order, not in the order the builds happened to finish.
        components = build.manifest.components
        order = [name for name in config.components if name in components]
        build.manifest.components = {n: components[n] for n in [*order, *(n for n in components if n not in order)]}
    return [results[name] for name in config.components]


def _release_model(build: _Build) -> None:
    """Drop this process's model (and on CUDA its cached memory) before the workers load theirs."""
    import gc

    import torch

    build.components = None
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _run_workers(build: _Build, todo: list[_Plan], given: EngineBackend | None) -> dict[str, ComponentResult]:
    """Build ``todo`` in a pool of spawned worker processes, recording each component as its build comes back.

    A worker's failure stops further builds from starting; those under way run to their end and are recorded if they
    succeed; then the first failure (in ``config.components`` order) is raised as the worker raised it. Ctrl-C (or
    any error here) interrupts the builds under way (``_interrupt_workers``).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    config = build.config
    context = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA, threads and open files
    relay = _Relay(context.Queue())
    pool = ProcessPoolExecutor(config.jobs, mp_context=context, initializer=_start_worker, initargs=(relay.queue,))
    waiting, running = list(todo), {}
    results: dict[str, ComponentResult] = {}
    failures: dict[str, BaseException] = {}
    try:
        while waiting or running:
            # Only as many builds as workers are handed over: one waiting in the pool's queue could not be cancelled.
            while waiting and len(running) < config.jobs:
                plan = waiting.pop(0)
                running[pool.submit(_build_in_worker, config, given, build.options, plan)] = plan
            relay.tell(build.say, POLL_S)
            for future in [f for f in running if f.done()]:
                plan = running.pop(future)
                error = future.exception()
                if error is None:
                    results[plan.name] = _record(build, plan.name, future.result())
                    continue
                if isinstance(error, KeyboardInterrupt):  # Ctrl-C reached the worker first
                    raise error
                if isinstance(error, BrokenProcessPool):
                    error = BuildError(
                        f"{plan.name}: its worker process ended without a result (killed, e.g. for lack of memory, "
                        f"crashed, or could not start; what it printed is above) while building with --jobs "
                        f"{config.jobs}: build with a lower --jobs, or --jobs 1"
                    )
                failures[plan.name] = error
                build.say(plan.name, f"failed: {first_line(error)}")
                if running:
                    build.say("build", f"waiting for {', '.join(p.name for p in running.values())} to finish")
                waiting.clear()
    except BaseException:
        _interrupt_workers(build, running, relay)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _remove_leftovers(build.out)  # a worker that was killed leaves its staging folder
    relay.tell(build.say, 0)  # the last messages, sent before the workers ended
    for name in config.components:
        if name in failures:
            raise failures[name]
    return results


def _interrupt_workers(build: _Build, running: dict, relay: _Relay) -> None:
    """Send SIGINT to the workers still building (each as soon as its first message names its pid), wait for them,
    and record the builds that finished all the same."""
    interrupted = set()
    while running:
        relay.tell(None, POLL_S)
        for plan in running.values():
            pid = relay.pids.get(plan.name)
            if pid is not None and plan.name not in interrupted:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGINT)
                interrupted.add(plan.name)
        for future in [f for f in running if f.done()]:
            plan = running.pop(future)
            if not future.cancelled() and future.exception() is None:
                _record(build, plan.name, future.result())


class _Relay:
    """Progress from the workers: ``(component, worker pid, message)`` on a queue, told in this process."""

    def __init__(self, queue: Any):
        self.queue = queue
        self.pids: dict[str, int] = {}  # component -> the worker process that builds it

    def tell(self, say: Progress | None, wait: float) -> None:
        """Pass every message waiting to ``say`` (None: only note the pids), waiting up to ``wait`` s for the first."""
        import queue

        try:
            item = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
            while True:
                component, pid, message = item
                self.pids[component] = pid
                if say is not None:
                    say(component, message)
                item = self.queue.get_nowait()
        except queue.Empty:
            pass


def _start_worker(to_parent: Any) -> None:
    """A worker process starts: keep the queue to the parent, and ignore Ctrl-C between builds.

    Ctrl-C in a terminal reaches every process of the group: a worker waiting for work would die of it with a
    traceback and break the pool, and has nothing to clean up. A build handles it (``_build_in_worker``).
    """
    global _to_parent
    _to_parent = to_parent
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _build_in_worker(config: BuildConfig, given: EngineBackend | None, options: BackendOptions,
                     plan: _Plan) -> ComponentEntry:  # fmt: skip
    """Build one planned component in a worker process, as ``_build_component`` builds it, and return its entry.

    The model is loaded on the first build of this process and kept for the next. The first message names this
    process's pid, which the parent needs to interrupt it. An error that would not survive the way back to the parent
    (pickling) is raised as a BuildError carrying its type and first line.
    """
    global _worker_model
    from fluxtrt.specs.flux import component_specs, dims_from_components

    pid = os.getpid()
    with watch_interrupts(once=True) as interrupts:  # a second SIGINT must not cut the staging cleanup short

        def say(component: str, message: str) -> None:
            interrupts.check()
            _to_parent.put((component, pid, message))

        say(plan.name, f"building in worker process {pid}")
        key = (config.model, config.device, COMPUTE_DTYPE[config.precision], config.vae)
        if _worker_model is None or _worker_model[0] != key:
            _worker_model = None  # one model per process
            _worker_model = (key, _load_model(config, lambda message: say(plan.name, message)))
        components = _worker_model[1]
        dims = dims_from_components(components)
        backend = given if given is not None else get_backend(config.backend)
        build = _Build(config, backend, options, components, dims, component_specs(dims), None, say, interrupts)
        try:
            return _build_component(build, plan.name, plan.settings, plan.profile, plan.amax)
        except Exception as exc:
            if _pickles(exc):
                raise
            raise BuildError(f"{plan.name}: {type(exc).__name__}: {first_line(exc)}") from exc


def _pickles(obj: Any) -> bool:
    """Whether ``obj`` survives pickling and unpickling (what crossing to another process takes)."""
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:
        return False
    return True


def _check_picklable(backend: EngineBackend, config: BuildConfig) -> None:
    """Raise InputError unless the backend object passed to ``build_engines`` can be sent to the workers."""
    if not _pickles(backend):
        raise InputError(
            f"the backend object {type(backend).__name__} does not pickle, so it cannot reach the --jobs "
            f"{config.jobs} worker processes: make it picklable (its class importable by name), pass no backend "
            f"object to use --backend {config.backend}, or build with --jobs 1"
        )
