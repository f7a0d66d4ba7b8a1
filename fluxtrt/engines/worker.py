"""A ``--jobs`` worker process: what it keeps between builds (the queue to the build process, the parts of the model
it loaded), its build of one planned component, and how its errors cross back to the build process as one line
(``fluxtrt.engines.jobs`` runs the pool)."""

from __future__ import annotations

import os
import pickle
import signal
from typing import Any

from fluxtrt.backends.base import BackendOptions, EngineBackend, get_backend
from fluxtrt.config import COMPUTE_DTYPE, BuildConfig
from fluxtrt.engines.component import BuildContext, build_component
from fluxtrt.engines.interrupt import sigint_ignored, watch_interrupts
from fluxtrt.engines.manifest import ComponentEntry
from fluxtrt.engines.plan import COMPONENT_PARTS, Plan, load_model
from fluxtrt.errors import BuildError, FluxtrtError, InputError, first_line
from fluxtrt.specs.flux import FluxDims

# Set in each worker process: the queue its progress goes to the parent on, and the model it loaded (once, for every
# component it builds).
_to_parent: Any = None
_worker_model: tuple[tuple, Any] | None = None
_parent_ignores_sigint = False  # the worker was started with SIGINT ignored (see start_worker)


def start_worker(to_parent: Any) -> None:
    """A worker process starts: keep the queue to the parent, and ignore Ctrl-C between builds.

    Ctrl-C in a terminal reaches every process of the group: a worker waiting for work would die of it with a
    traceback and break the pool, and has nothing to clean up. A build handles it (``build_in_worker``), unless the
    worker was started ignoring it (its parent does: the ignored disposition is inherited).
    """
    global _to_parent, _parent_ignores_sigint
    _to_parent = to_parent
    _parent_ignores_sigint = sigint_ignored()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_in_worker(config: BuildConfig, given: EngineBackend | None, options: BackendOptions, plan: Plan,
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
            raise one_line(plan.name, exc) from None


def one_line(name: str, exc: BaseException) -> BuildError:
    """An error other than fluxtrt's own (an out-of-memory error of torch, say) as a BuildError of one line carrying
    its type and first line."""
    hint = " (try a lower --jobs, or --jobs 1)" if "out of memory" in str(exc).lower() else ""
    return BuildError(f"{name}: {type(exc).__name__}: {first_line(exc)}{hint}")


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
