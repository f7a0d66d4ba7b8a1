"""``fluxtrt build --jobs N|auto``: components built at once in spawned worker processes.

The build process plans every component (``plan_component``: settings, calibration, the up-to-date check), lets its
copy of the model go (all but a large transformer, which it then builds itself: ``BUILD_HERE_FROM``), decides how
many components fit at once (``fluxtrt.engines.fit``; ``auto`` builds small components in this process instead) and
hands the builds out, the transformer first, one per free worker whose component fits the memory beside those
running, so that a failure can keep the rest from starting. A worker (``fluxtrt.engines.worker``) loads only the
parts of the model its component needs (kept for its next build when that needs the same) and builds with
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
import signal
from collections.abc import Iterator
from typing import Any

from fluxtrt.backends.base import EngineBackend
from fluxtrt.engines.component import BuildContext, Progress, remove_leftovers
from fluxtrt.engines.fit import (
    SMALL_FOOTPRINT,
    Budget,
    builds_in_process,
    component_footprints,
    decide_jobs,
    free_memory,
    usable_cores,
)
from fluxtrt.engines.manifest import ComponentEntry
from fluxtrt.engines.plan import (
    COMPONENT_PARTS,
    ComponentResult,
    Plan,
    build_planned,
    ensure_model,
    plan_component,
    record_built,
    skipped_result,
)
from fluxtrt.engines.worker import build_in_worker, one_line, start_worker
from fluxtrt.errors import BuildError, FluxtrtError, first_line
from fluxtrt.specs.flux import TRANSFORMERS

# Seconds the parent waits for a worker's message before it looks at the builds again.
POLL_S = 0.2

# A transformer whose build footprint (``component_footprints``) reaches this is built by the build process, from
# the model it holds: a worker would start and load it again before its compile could begin (random-full's on an
# H100: 18 s from the end of calibration to the start of the compile, build_h100_5dd9f85/build_first.log). A smaller
# one goes to a worker like the rest: loading it costs next to nothing, and the build process would build it and then
# wait while the workers built everything else, one fewer of them at work from the start.
BUILD_HERE_FROM = SMALL_FOOTPRINT


def build_in_workers(build: BuildContext, given: EngineBackend | None) -> list[ComponentResult]:
    """Plan every component here, then build those out of date in as many worker processes as ``--jobs`` says
    (``auto``: as many as fit the memory free, said in one line; in this process when they are all small).

    Calibration (in ``plan_component``) runs here, before any worker starts, so its file is written once. The
    transformer (or its first part) starts first: it takes longest, and the others are built beside it. Where this
    process holds the model (it calibrated, or read the model's dimensions off it) and the transformer is a large
    one (``BUILD_HERE_FROM``), it builds that transformer itself, from the copy it holds, and lets the rest of the
    model go. Otherwise it lets its copy of the model go, so that the workers' parts are all there is.

    Args:
        build: the build, its model loaded and its manifest saved.
        given: the backend object the caller passed (pickled to the workers), or None (they look it up by name).

    Returns:
        The results, in ``config.components`` order.

    Raises:
        FluxtrtError: the failure of the first component in ``config.components`` order that failed, as its worker
            (or this process) raised it (one line), once the builds under way have ended; BuildError for a worker
            process that died; DeviceError for a ``--jobs`` whose components do not fit the memory free at once.
        KeyboardInterrupt: Ctrl-C, once the workers still building have been interrupted and have stopped.
    """
    config = build.config
    plans = {name: plan_component(build, name) for name in config.components}
    results = {name: skipped_result(build, name) for name, plan in plans.items() if plan.up_to_date}
    todo = sorted((p for p in plans.values() if not p.up_to_date), key=lambda p: p.name not in TRANSFORMERS)
    if todo:
        footprints = component_footprints(config, [p.name for p in todo])
        cores, compiles = usable_cores(), build.backend.compiles_small_components
        here, held = None, 0
        if not builds_in_process(config.jobs, footprints, cores, compiles):
            here = _built_here(build, todo[0], footprints)
            # before measuring: what the workers have is what this process frees
            held = _release_model(build, COMPONENT_PARTS[here.name] if here else ())
        free = free_memory(config.device, held)
        decision = decide_jobs(config.jobs, footprints, free, cores, compiles)
        build.say("build", decision.line)
        if decision.workers:
            results.update(_run_workers(build, todo, given, decision.jobs, Budget(footprints, free), here))
        else:
            for plan in todo:
                ensure_model(build)
                results[plan.name] = record_built(build, plan.name, build_planned(build, plan))
        # Listed in --components order, not in the order the builds happened to finish.
        components = build.manifest.components
        order = [name for name in config.components if name in components]
        build.manifest.components = {n: components[n] for n in [*order, *(n for n in components if n not in order)]}
    return [results[name] for name in config.components]


def _built_here(build: BuildContext, first: Plan, footprints: dict[str, int]) -> Plan | None:
    """``first`` where it is a transformer of at least ``BUILD_HERE_FROM`` and this process holds the parts it is
    built from, else None."""
    model = build.components
    if first.name not in TRANSFORMERS or model is None or footprints[first.name] < BUILD_HERE_FROM:
        return None
    return first if all(getattr(model, part, None) is not None for part in COMPONENT_PARTS[first.name]) else None


def _release_model(build: BuildContext, keep: tuple[str, ...] = ()) -> int:
    """Drop this process's model but the parts ``keep`` (and on CUDA its cached memory) before the workers load
    theirs; returns the bytes of the parameters and buffers kept."""
    import dataclasses
    import gc

    import torch

    model, held = build.components, 0
    if keep and model is not None:
        dropped = {part: None for part in model.modules() if part not in keep}
        build.components = dataclasses.replace(model, **dropped)
        for part in keep:
            module = getattr(model, part)
            held += sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    else:
        build.components = None
    del model
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return held


def _run_workers(build: BuildContext, todo: list[Plan], given: EngineBackend | None, jobs: int, budget: Budget,
                 here: Plan | None = None) -> dict[str, ComponentResult]:  # fmt: skip
    """Build ``todo`` in a pool of spawned worker processes, ``jobs`` at once, recording each component as its
    build comes back; the next component starts when a worker is free and its footprint fits beside those running
    (``budget``). ``here``: the plan of ``todo`` this process builds itself, first, while the workers build the
    others beside it (their progress told from a thread meanwhile).

    A failure stops further builds from starting; those under way run to their end and are recorded if they
    succeed; then the first failure (in ``config.components`` order) is raised as the worker raised it, without the
    worker's traceback. Ctrl-C (or any error here) interrupts the builds under way (``_interrupt_workers``).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA, threads and open files
    relay = _Relay(context.Queue())
    # ``jobs`` workers: one fewer builds while this process builds ``here``, all of them once it is done.
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=start_worker, initargs=(relay.queue,))
    builds = _Builds(build, [p for p in todo if p is not here], given, jobs, budget, pool)
    try:
        if here is not None:
            builds.build_here(here, relay)
        while builds.waiting or builds.running:
            builds.start_fitting()
            relay.tell(build.say, POLL_S)
            if builds.collect() and builds.running:
                build.say("build", f"waiting for {', '.join(p.name for p in builds.running.values())} to finish")
    except BaseException:
        _interrupt_workers(build, builds.running, relay)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        remove_leftovers(build.out)  # a worker that was killed leaves its staging folder
    relay.tell(build.say, 0)  # the last messages, sent before the workers ended
    for name in build.config.components:
        if name in builds.failures:
            raise builds.failures[name] from None  # its cause is the worker's traceback, as text: not for the user
    return builds.results


class _Builds:
    """The builds of one ``_run_workers``: those waiting, those running in the pool (future -> plan), and what came
    back (results and failures by component)."""

    def __init__(self, build: BuildContext, waiting: list[Plan], given: EngineBackend | None, jobs: int,
                 budget: Budget, pool: Any):  # fmt: skip
        self.build, self.waiting, self.given = build, waiting, given
        self.jobs, self.budget, self.pool = jobs, budget, pool
        self.running: dict[Any, Plan] = {}
        self.results: dict[str, ComponentResult] = {}
        self.failures: dict[str, BaseException] = {}
        self.busy_here = 0  # 1 while this process builds a component itself

    def start_fitting(self) -> None:
        """Hand the waiting builds to the pool while a worker is free and the next one's footprint fits; only as
        many as there are workers: one waiting in the pool's queue could not be cancelled."""
        build = self.build
        while (
            self.waiting and len(self.running) + self.busy_here < self.jobs and self.budget.fits(self.waiting[0].name)
        ):
            plan = self.waiting.pop(0)
            self.budget.start(plan.name)
            future = self.pool.submit(build_in_worker, build.config, self.given, build.options, plan, build.dims)
            self.running[future] = plan

    def build_here(self, plan: Plan, relay: _Relay) -> None:
        """Build ``plan`` in this process while the workers start on the others, and record how it went."""
        self.budget.start(plan.name)
        self.busy_here = 1
        self.start_fitting()
        with _relayed(relay, self.build.say):
            entry, error = _build_here(self.build, plan)
            _release_model(self.build)  # what it held is the budget's again (another transformer part's worker)
        self.busy_here = 0
        self.budget.end(plan.name)
        if error is None:
            self.results[plan.name] = record_built(self.build, plan.name, entry)
        else:
            self.fail(plan, error)

    def collect(self) -> bool:
        """Record the builds that came back; whether one of them failed."""
        from concurrent.futures.process import BrokenProcessPool

        failed = False
        for future in [f for f in self.running if f.done()]:
            plan = self.running.pop(future)
            self.budget.end(plan.name)
            error = future.exception()
            if error is None:
                self.results[plan.name] = record_built(self.build, plan.name, future.result())
                continue
            if isinstance(error, KeyboardInterrupt):  # Ctrl-C reached the worker first
                raise error
            if isinstance(error, BrokenProcessPool):  # the pool ends every worker when one of them dies
                error = BuildError(
                    f"{plan.name}: a worker process ended without a result while it was being built (killed, e.g. "
                    f"for lack of memory, crashed, or could not start; what it printed is above) with {self.jobs} at "
                    "once: build with a lower --jobs, or --jobs 1"
                )
            elif not isinstance(error, FluxtrtError):
                error = BuildError(f"{plan.name}: {type(error).__name__}: {first_line(error)}")
            self.fail(plan, error)
            failed = True
        return failed

    def fail(self, plan: Plan, error: BaseException) -> None:
        """``plan`` failed: say so, and start nothing more."""
        self.failures[plan.name] = error
        self.build.say(plan.name, f"failed: {first_line(error)}")
        self.waiting.clear()


def _build_here(build: BuildContext, plan: Plan) -> tuple[ComponentEntry | None, BaseException | None]:
    """Build ``plan`` in this process, from the model it holds: (its entry, None) or (None, the error as a worker
    would have raised it)."""
    build.say(plan.name, "building in this process, from the model loaded here")
    try:
        return build_planned(build, plan), None
    except Exception as exc:
        return None, exc if isinstance(exc, FluxtrtError) else one_line(plan.name, exc)


@contextlib.contextmanager
def _relayed(relay: _Relay, say: Progress) -> Iterator[None]:
    """Tell the workers' progress from a thread for the duration, while this process's main thread builds."""
    import threading

    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                relay.tell(say, POLL_S)
            except KeyboardInterrupt:  # ``say`` raises the Ctrl-C this process saw again: its main thread has it
                return

    thread = threading.Thread(target=run, name="fluxtrt-relay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


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
