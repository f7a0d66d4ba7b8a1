"""``fluxtrt build --jobs N|auto``: components built at once in spawned worker processes.

The build process plans every component (``plan_component``: settings, calibration, the up-to-date check), lets its
copy of the model go, decides how many components fit at once (``fluxtrt.engines.fit``; ``auto`` builds small
components in this process instead) and hands the builds out, the transformer first, one per free worker whose
component fits the memory beside those running, so that a failure can keep the rest from starting. A worker loads
only the parts of the model its component needs (kept for its next build when that needs the same) and builds with
``build_component``, as the build process does with ``--jobs 1`` (its staging folders carry its pid); it returns the
manifest entry, and only the build process writes ``manifest.json``. Progress travels on a queue as ``(component,
worker pid, message)`` and is told in the build process while the workers run. A worker's error reaches the build
process as one line.

Ctrl-C: in a terminal it reaches every process of the group; the build process also sends SIGINT to each worker still
building (its pid comes with its first message), waits for them and records what finished. A worker ignores SIGINT
between builds and raises it once within one, so a second signal does not cut its staging cleanup short; started by
a build process that ignores SIGINT (``fluxtrt.engines.interrupt``), it ignores it within builds too.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
from typing import Any

from fluxtrt.backends.base import BackendOptions, EngineBackend, get_backend
from fluxtrt.config import COMPUTE_DTYPE, BuildConfig
from fluxtrt.engines.component import BuildContext, Progress, build_component, remove_leftovers
from fluxtrt.engines.fit import (
    Budget,
    builds_in_process,
    component_footprints,
    decide_jobs,
    free_memory,
    usable_cores,
)
from fluxtrt.engines.interrupt import sigint_ignored, watch_interrupts
from fluxtrt.engines.manifest import ComponentEntry
from fluxtrt.engines.plan import (
    COMPONENT_PARTS,
    ComponentResult,
    Plan,
    ensure_model,
    load_model,
    plan_component,
    record_built,
    skipped_result,
)
from fluxtrt.errors import BuildError, FluxtrtError, InputError, first_line
from fluxtrt.specs.flux import TRANSFORMERS, FluxDims

# Seconds the parent waits for a worker's message before it looks at the builds again.
POLL_S = 0.2

# Set in each worker process: the queue its progress goes to the parent on, and the model it loaded (once, for every
# component it builds).
_to_parent: Any = None
_worker_model: tuple[tuple, Any] | None = None
_parent_ignores_sigint = False  # the worker was started with SIGINT ignored (see _start_worker)


def build_in_workers(build: BuildContext, given: EngineBackend | None) -> list[ComponentResult]:
    """Plan every component here, then build those out of date in as many worker processes as ``--jobs`` says
    (``auto``: as many as fit the memory free, said in one line; in this process when they are all small).

    Calibration (in ``plan_component``) runs here, before any worker starts, so its file is written once. This
    process then lets its copy of the model go, so the workers' parts are all there is. The transformer (or its
    parts) starts first: it takes longest, and the others are built beside it.

    Args:
        build: the build, its model loaded and its manifest saved.
        given: the backend object the caller passed (pickled to the workers), or None (they look it up by name).

    Returns:
        The results, in ``config.components`` order.

    Raises:
        FluxtrtError: the failure of the first component in ``config.components`` order that failed, as its worker
            raised it (one line), once the builds under way have ended; BuildError for a worker process that died;
            DeviceError for a ``--jobs`` whose components do not fit the memory free at once.
        KeyboardInterrupt: Ctrl-C, once the workers still building have been interrupted and have stopped.
    """
    config = build.config
    plans = {name: plan_component(build, name) for name in config.components}
    results = {name: skipped_result(build, name) for name, plan in plans.items() if plan.up_to_date}
    todo = sorted((p for p in plans.values() if not p.up_to_date), key=lambda p: p.name not in TRANSFORMERS)
    if todo:
        footprints = component_footprints(config, [p.name for p in todo])
        cores, compiles = usable_cores(), build.backend.compiles_small_components
        if not builds_in_process(config.jobs, footprints, cores, compiles):
            _release_model(build)  # before measuring: what the workers have is what this process frees
        free = free_memory(config.device)
        decision = decide_jobs(config.jobs, footprints, free, cores, compiles)
        build.say("build", decision.line)
        if decision.workers:
            results.update(_run_workers(build, todo, given, decision.jobs, Budget(footprints, free)))
        else:
            for plan in todo:
                ensure_model(build)
                build.manifest.components.pop(plan.name, None)
                entry = build_component(build, plan.name, plan.settings, plan.profile, plan.amax)
                results[plan.name] = record_built(build, plan.name, entry)
        # Listed in --components order, not in the order the builds happened to finish.
        components = build.manifest.components
        order = [name for name in config.components if name in components]
        build.manifest.components = {n: components[n] for n in [*order, *(n for n in components if n not in order)]}
    return [results[name] for name in config.components]


def _release_model(build: BuildContext) -> None:
    """Drop this process's model (and on CUDA its cached memory) before the workers load theirs."""
    import gc

    import torch

    build.components = None
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _run_workers(build: BuildContext, todo: list[Plan], given: EngineBackend | None, jobs: int,
                 budget: Budget) -> dict[str, ComponentResult]:  # fmt: skip
    """Build ``todo`` in a pool of ``jobs`` spawned worker processes, recording each component as its build comes
    back; the next component starts when a worker is free and its footprint fits beside those running (``budget``).

    A worker's failure stops further builds from starting; those under way run to their end and are recorded if they
    succeed; then the first failure (in ``config.components`` order) is raised as the worker raised it, without the
    worker's traceback. Ctrl-C (or any error here) interrupts the builds under way (``_interrupt_workers``).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    config = build.config
    context = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA, threads and open files
    relay = _Relay(context.Queue())
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(relay.queue,))
    waiting, running = list(todo), {}
    results: dict[str, ComponentResult] = {}
    failures: dict[str, BaseException] = {}
    try:
        while waiting or running:
            # Only as many builds as workers are handed over: one waiting in the pool's queue could not be cancelled.
            while waiting and len(running) < jobs and budget.fits(waiting[0].name):
                plan = waiting.pop(0)
                budget.start(plan.name)
                running[pool.submit(_build_in_worker, config, given, build.options, plan, build.dims)] = plan
            relay.tell(build.say, POLL_S)
            failed = False
            for future in [f for f in running if f.done()]:
                plan = running.pop(future)
                budget.end(plan.name)
                error = future.exception()
                if error is None:
                    results[plan.name] = record_built(build, plan.name, future.result())
                    continue
                if isinstance(error, KeyboardInterrupt):  # Ctrl-C reached the worker first
                    raise error
                if isinstance(error, BrokenProcessPool):  # the pool ends every worker when one of them dies
                    error = BuildError(
                        f"{plan.name}: a worker process ended without a result while it was being built (killed, "
                        f"e.g. for lack of memory, crashed, or could not start; what it printed is above) with "
                        f"{jobs} at once: build with a lower --jobs, or --jobs 1"
                    )
                elif not isinstance(error, FluxtrtError):
                    error = BuildError(f"{plan.name}: {type(error).__name__}: {first_line(error)}")
                failures[plan.name] = error
                build.say(plan.name, f"failed: {first_line(error)}")
                failed = True
            if failed:
                waiting.clear()
                if running:
                    build.say("build", f"waiting for {', '.join(p.name for p in running.values())} to finish")
    except BaseException:
        _interrupt_workers(build, running, relay)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        remove_leftovers(build.out)  # a worker that was killed leaves its staging folder
    relay.tell(build.say, 0)  # the last messages, sent before the workers ended
    for name in config.components:
        if name in failures:
            raise failures[name] from None  # its cause is the worker's traceback, as text: not for the user
    return results


def _interrupt_workers(build: BuildContext, running: dict, relay: _Relay) -> None:
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
                record_built(build, plan.name, future.result())


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
    traceback and break the pool, and has nothing to clean up. A build handles it (``_build_in_worker``), unless the
    worker was started ignoring it (its parent does: the ignored disposition is inherited).
    """
    global _to_parent, _parent_ignores_sigint
    _to_parent = to_parent
    _parent_ignores_sigint = sigint_ignored()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _build_in_worker(config: BuildConfig, given: EngineBackend | None, options: BackendOptions, plan: Plan,
                     dims: FluxDims) -> ComponentEntry:  # fmt: skip
    """Build one planned component in a worker process, as ``build_component`` builds it, and return its entry.

    Only the parts of the model the component needs are loaded (``COMPONENT_PARTS``), and kept for this process's
    next build if it needs the same; other parts are let go first. The first message names this process's pid, which
    the parent needs to interrupt it. An error other than fluxtrt's own (an out-of-memory error of torch, say), or
    one that would not survive the way back to the parent (pickling), is raised as a BuildError of one line carrying
    its type and first line.
    """
    global _worker_model
    from fluxtrt.environment import free_device_memory
    from fluxtrt.specs.flux import component_specs

    pid = os.getpid()
    # once: a second SIGINT must not cut the staging cleanup short
    with watch_interrupts(once=True, ignored=_parent_ignores_sigint) as interrupts:

        def say(component: str, message: str) -> None:
            interrupts.check()
            _to_parent.put((component, pid, message))

        say(plan.name, f"building in worker process {pid}")
        parts = COMPONENT_PARTS[plan.name]
        key = (config.model, config.device, COMPUTE_DTYPE[config.precision], config.vae, parts)
        try:
            if _worker_model is None or _worker_model[0] != key:
                _worker_model = None  # one set of parts per process: the last one's memory is freed first
                free_device_memory()
                _worker_model = (key, load_model(config, lambda message: say(plan.name, message), parts))
            components = _worker_model[1]
            backend = given if given is not None else get_backend(config.backend)
            build = BuildContext(config, backend, options, components, dims, component_specs(dims), None, say,
                                 interrupts)  # fmt: skip
            return build_component(build, plan.name, plan.settings, plan.profile, plan.amax)
        except Exception as exc:
            if isinstance(exc, FluxtrtError) and _pickles(exc):
                raise
            hint = " (try a lower --jobs, or --jobs 1)" if "out of memory" in str(exc).lower() else ""
            raise BuildError(f"{plan.name}: {type(exc).__name__}: {first_line(exc)}{hint}") from None


def _pickles(obj: Any) -> bool:
    """Whether ``obj`` survives pickling and unpickling (what crossing to another process takes)."""
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:
        return False
    return True


def check_picklable(backend: EngineBackend, config: BuildConfig) -> None:
    """Raise InputError unless ``backend`` (the object passed to ``build_engines``) can be sent to the workers."""
    if not _pickles(backend):
        raise InputError(
            f"the backend object {type(backend).__name__} does not pickle, so it cannot reach the --jobs "
            f"{config.jobs} worker processes: make it picklable (its class importable by name), pass no backend "
            f"object to use --backend {config.backend}, or build with --jobs 1"
        )
