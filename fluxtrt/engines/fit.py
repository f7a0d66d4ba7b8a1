"""How many components a ``--jobs`` build builds at once: each component's memory footprint against the memory free
on the GPU (with ``--device cuda``) and on the host, decided before the workers start, and checked again before each
one starts (``Budget``)."""

from __future__ import annotations

from dataclasses import dataclass

from fluxtrt.config import COMPUTE_DTYPE, BuildConfig
from fluxtrt.errors import DeviceError

# What building one component takes, as a multiple of its weights in the build's compute dtype: the loaded module
# (1x) plus the copies export and compile make (the ONNX serialisation of the weights, AOTInductor's constant folding
# and weight blob, quantized copies), and the activations of the sample inputs. An estimate, not a measurement:
# check it against a build's peak GPU and host memory on a GPU machine and adjust.
BUILD_FOOTPRINT_FACTOR = 2.0
# Below this largest footprint, ``--jobs auto`` builds in the build process, one component after another: starting
# a worker (Python, torch, the model) costs more than building such components side by side saves. Except where the
# backend compiles each component (``EngineBackend.compiles_small_components``) and the host has several cores: then
# one worker per core, as memory allows.
SMALL_FOOTPRINT = 2**30

GIB = 2**30


def component_footprints(config: BuildConfig, names: list[str]) -> dict[str, int]:
    """Estimated bytes that building each of ``names`` takes (``BUILD_FOOTPRINT_FACTOR`` times the parameter bytes
    of the parts it is built from, in the build's compute dtype), read without loading the model. With the slim
    autoencoder the model's own VAE is counted (an upper bound)."""
    import torch

    from fluxtrt.engines.plan import COMPONENT_PARTS
    from fluxtrt.models.loading import part_parameters, torch_dtype

    itemsize = torch.empty((), dtype=torch_dtype(COMPUTE_DTYPE[config.precision])).element_size()
    counts: dict[str, int] = {}
    footprints = {}
    for name in names:
        parts = COMPONENT_PARTS[name]
        for part in parts:
            if part not in counts:
                counts[part] = part_parameters(config.model, part)
        footprints[name] = round(sum(counts[p] for p in parts) * itemsize * BUILD_FOOTPRINT_FACTOR)
    return footprints


def free_memory(device: str, held: int = 0) -> dict[str, int]:
    """Bytes free where a build uses memory: ``GPU`` (with a CUDA device) and ``host``; a pool that cannot be read
    is left out (not limited). ``held``: bytes on ``device`` that the build process keeps for a build of its own,
    counted as free (that build's footprint, ``component_footprints``, includes them)."""
    from fluxtrt.environment import available_memory

    cuda = str(device).startswith("cuda")
    pools = {"GPU": device} if cuda else {}
    pools["host"] = "cpu"
    free = {pool: available_memory(where) for pool, where in pools.items()}
    own = "GPU" if cuda else "host"
    return {pool: n + (held if pool == own else 0) for pool, n in free.items() if n is not None}


@dataclass
class Decision:
    """How many components are built at once, whether in worker processes, and the line that says why."""

    jobs: int
    workers: bool
    line: str


def decide_jobs(requested: int | str, footprints: dict[str, int], free: dict[str, int], cores: int = 1,
                compiles: bool = False) -> Decision:  # fmt: skip
    """``--jobs`` for the components of ``footprints`` (those to build) and the memory ``free`` per pool.

    ``auto``: as many as fit at once whichever run together (the largest footprints together fit every pool), in
    worker processes, each loading only its parts; in this process when every footprint is small
    (``SMALL_FOOTPRINT``), unless the backend ``compiles`` each component and the host has several ``cores``: then
    as many as there are cores (and components), as memory allows. A number: that many workers, when that many of
    the largest fit.

    Raises:
        DeviceError: a number whose largest components do not fit at once, or (auto) a component that does not fit
            alone; the line names the memory needed and free.
    """
    largest = sorted(footprints.values(), reverse=True)
    biggest = largest[0] if largest else 0
    where = ", ".join(f"{free[p] / GIB:.1f} GiB free on {p}" for p in free) or "free memory unknown"
    said = f"{where}, largest footprint {biggest / GIB:.1f} GiB"
    if requested != "auto":
        need = sum(largest[: int(requested)])
        short = [p for p, n in free.items() if need > n]
        if short:
            raise DeviceError(
                f"--jobs {requested} needs about {need / GIB:.1f} GiB to build its largest components at once (an "
                f"estimate) but {'; '.join(f'{free[p] / GIB:.1f} GiB is free on {p}' for p in short)}: pass --jobs "
                "auto, a lower --jobs, or --jobs 1"
            )
        return Decision(int(requested), True, f"building up to {requested} components at once (--jobs): {said}")
    if builds_in_process(requested, footprints, cores, compiles):
        return Decision(1, False, f"building 1 component at once, in this process (small components): {said}")
    small = biggest < SMALL_FOOTPRINT
    most = min(len(largest), cores) if small else len(largest)
    jobs = 0
    while jobs < most and all(sum(largest[: jobs + 1]) <= n for n in free.values()):
        jobs += 1
    if small and jobs > 1:
        return Decision(jobs, True, f"building {jobs} components at once (small, compiled side by side on {cores} "
                                    f"cores): {said}")  # fmt: skip
    if jobs == 0:
        short = next(p for p, n in free.items() if biggest > n)
        raise DeviceError(
            f"the largest component needs about {biggest / GIB:.1f} GiB to build (an estimate) but "
            f"{free[short] / GIB:.1f} GiB is free on {short}: free memory, or pass --jobs 1 to build in one process "
            "without this check"
        )
    return Decision(jobs, True, f"building {jobs} component{'s' * (jobs > 1)} at once: {said}")


def builds_in_process(requested: int | str, footprints: dict[str, int], cores: int, compiles: bool) -> bool:
    """Whether ``decide_jobs`` builds the components of ``footprints`` in the build process (``auto``, every
    footprint small, and not a compiling backend with several cores and components)."""
    small = requested == "auto" and max(footprints.values(), default=0) < SMALL_FOOTPRINT
    return small and not (compiles and cores >= 2 and len(footprints) >= 2)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Budget:
    """The memory the running builds hold, against what was free when the workers started: a build starts only
    when its footprint fits beside those running."""

    def __init__(self, footprints: dict[str, int], free: dict[str, int]):
        self.footprints, self.free = footprints, free
        self.running: dict[str, int] = {}

    def fits(self, name: str) -> bool:
        """Whether ``name`` fits now (with nothing running it fits: ``decide_jobs`` checked each alone)."""
        held = sum(self.running.values())
        return not self.running or all(held + self.footprints[name] <= n for n in self.free.values())

    def start(self, name: str) -> None:
        self.running[name] = self.footprints[name]

    def end(self, name: str) -> None:
        self.running.pop(name, None)
