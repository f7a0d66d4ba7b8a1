"""The one thread that owns the GPU: it loads and warms up the pipeline, then runs queued edits, batching requests
of the same geometry, settings and LoRA (name and scale) into one pipeline call up to the batch the engines were
built for."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from fluxtrt.config import SamplerConfig
from fluxtrt.errors import FluxtrtError, InputError, first_line
from fluxtrt.serve.request import EditRequest, RequestError
from fluxtrt.specs.flux import Resolution


class QueueFull(RequestError):
    def __init__(self, depth: int):
        super().__init__(f"the server is busy ({depth} requests queued, its limit): retry in a few seconds", None,
                         "queue_full", 503)  # fmt: skip


class Unavailable(RequestError):
    def __init__(self, state: str, detail: str = ""):
        message = {"loading": "the model is still loading: retry when /ready answers 200",
                   "stopping": "the server is shutting down: retry on another instance"}.get(state, "")  # fmt: skip
        super().__init__(message or f"the model failed to load ({detail}): see the server's log", None, state, 503)


@dataclass
class Job:
    """A queued request with its geometry (which decides what it may be batched with) and where its result goes."""

    request: EditRequest
    target: Resolution
    reference: Resolution
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple:
        r = self.request
        return self.target, self.reference, r.steps, r.guidance, r.max_area, r.loras


@dataclass
class JobResult:
    """What a job's requester gets: its images, the batch they were made in, and server-side times."""

    images: list[Any]
    target: Resolution
    batch: int
    queue_ms: float
    edit_ms: float
    timings_ms: dict[str, float]
    warnings: list[str]


def edit_batch(pipeline: Any, sampler: SamplerConfig, jobs: list[Job], keep_reference_size: bool,
               switch: Any = None) -> list[JobResult]:  # fmt: skip
    """Run ``jobs`` (one geometry, settings and LoRA selection) as one pipeline call; image i of a request uses seed
    ``seed + i``, so a request gets the same images whatever it was batched with. The LoRAs of the batch are merged
    into the transformer first (``switch``, a ``fluxtrt.serve.loras.LoraSwitch``; None: the server has none)."""
    first = jobs[0].request
    if switch is not None:
        switch.use(first.loras)
    images = [img for j in jobs for img in [j.request.image] * j.request.n]
    prompts = [p for j in jobs for p in [j.request.prompt] * j.request.n]
    seeds = [s for j in jobs for s in j.request.seeds]
    size = first.size
    started = time.perf_counter()
    result = pipeline.edit(images, prompts, sampler=replace(sampler, steps=first.steps), seed=seeds,
                           guidance=first.guidance, height=size.height if size else None,
                           width=size.width if size else None, max_area=first.max_area,
                           auto_resize=not keep_reference_size)  # fmt: skip
    edit_ms = (time.perf_counter() - started) * 1000
    results, at = [], 0
    for j in jobs:
        queue_ms = (started - j.queued_at) * 1000
        images = result.images[at : at + j.request.n]
        at += j.request.n
        results.append(JobResult(images, result.target, len(prompts), queue_ms, edit_ms, result.timings_ms,
                                 result.warnings))  # fmt: skip
    return results


class EditWorker:
    """Owns the pipeline from one thread.

    Args:
        start: called on the worker thread; loads and warms up, and returns the ``fluxtrt.serve.load.Loaded``
            pipeline (its owner closes it). Until it returns, submits are refused as loading; if it raises, as
            failed.
        sampler: solver and schedule of every edit.
        max_queue: requests that may wait; one more is refused with ``QueueFull``.
        keep_reference_size: see ``ServeConfig``.
        on_batch: called after each pipeline call with (images made, seconds, outcome).
        on_depth: called with the queue depth whenever it changes.
        on_busy: called with the images of the pipeline call that starts, and with 0 when it ends.
    """

    def __init__(self, start: Callable[[], Any], sampler: SamplerConfig, max_queue: int,
                 keep_reference_size: bool = False, on_batch: Callable[[int, float, str], None] | None = None,
                 on_depth: Callable[[int], None] | None = None,
                 on_busy: Callable[[int], None] | None = None):  # fmt: skip
        self._start = start
        self.sampler, self.max_queue = sampler, max_queue
        self.max_batch = 1  # the loaded pipeline's, once loaded
        self.keep_reference_size = keep_reference_size
        self._on_batch = on_batch or (lambda n, s, o: None)
        self._on_depth = on_depth or (lambda d: None)
        self._on_busy = on_busy or (lambda n: None)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.state, self.error = "loading", ""
        self.loaded: Any = None
        self.loras: dict[str, Any] = {}  # name -> the LoRA read (fluxtrt.lora.files.Lora), its scale the default
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fluxtrt-worker", daemon=True)

    def start(self) -> EditWorker:
        self._thread.start()
        return self

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future gets a ``JobResult`` or the error that failed it.

        Raises:
            Unavailable: loading, failed or stopping.
            QueueFull: ``max_queue`` requests are waiting already.
        """
        with self._cond:
            if self._stopping:
                raise Unavailable("stopping")
            if self.state != "ready":
                raise Unavailable(self.state, self.error)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(len(self._queue))
            self._queue.append(job)
            self._on_depth(len(self._queue))
            self._cond.notify()
        return job.future

    def cancel(self, job: Job) -> bool:
        """Drop ``job`` if it is still queued (its client is gone); False when it already runs or ran."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self._on_depth(len(self._queue))
        job.future.cancel()
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Take no more jobs, finish those queued and running, and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and self.state != "loading":
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self.loaded = self._start()
        except BaseException as exc:  # noqa: BLE001 (reported through /ready and every refused request)
            self.state, self.error = "failed", first_line(exc)
            return
        with self._cond:
            self.max_batch = self.loaded.max_batch
            self.state = "ready"
        self.ready.set()
        while (jobs := self._next()) is not None:
            self._execute(jobs)

    def _next(self) -> list[Job] | None:
        """The oldest job and the queued ones that can share its pipeline call; None when stopping and empty."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            jobs, images = [first], first.request.n
            for job in list(self._queue):
                if job.key == first.key and images + job.request.n <= self.max_batch:
                    self._queue.remove(job)
                    jobs.append(job)
                    images += job.request.n
            self._on_depth(len(self._queue))
        return [j for j in jobs if j.future.set_running_or_notify_cancel()]

    def _execute(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        started = time.perf_counter()
        images = sum(j.request.n for j in jobs)
        self._on_busy(images)
        try:
            results = edit_batch(self.loaded.pipeline, self.sampler, jobs, self.keep_reference_size,
                                 self.loaded.loras)  # fmt: skip
        except InputError as exc:
            outcome, error = "bad_request", RequestError(str(exc), None, "invalid_value", 400)
        except FluxtrtError as exc:
            outcome, error = "failed", RequestError(first_line(exc), None, "edit_failed", 500)
        except Exception as exc:  # noqa: BLE001 (one failed batch must not stop the server)
            outcome, error = "failed", RequestError(f"the edit failed: {first_line(exc)}", None, "edit_failed", 500)
        else:
            outcome, error = "ok", None
        self._on_busy(0)
        self._on_batch(images, time.perf_counter() - started, outcome)
        for i, job in enumerate(jobs):
            if error is None:
                job.future.set_result(results[i])
            else:
                job.future.set_exception(error)
