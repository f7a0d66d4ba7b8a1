"""Shared fixtures: the tiny model (built once per session), its engines (built once per test run, for the backend
tests and the runner contract test), small synthetic reference images, and the CLI helpers.

The engines are built once per run even where pytest-xdist spreads the tests over processes: they go to a folder
every process of the run sees (``run_dir``), each built by the first process that needs it while the others wait on
its lock (``exclusive``) and then use it.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# PyTorch's CPU allocator backs tensors of 2 MB and more with transparent huge pages (where the kernel offers them on
# request): a ~1 MP edit allocates and frees activations of tens of MB, each otherwise faulted in 4 KB at a time.
# Set before torch allocates anything, here and in every process the tests start; it changes no computed value.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fluxtrt.specs import Resolution

WORKER_MEMORY = 6 * 2**30  # a test process's peak (about 4.5 GB: the tiny model, its engines, ~1 MP edits), rounded up


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (the default, pyproject's addopts): one test process per core, as many as host memory holds; the
    GPU tests (``-m gpu``) in one process, as they share the card."""
    marks = config.option.markexpr or ""
    if "gpu" in marks and "not gpu" not in marks:
        return 0
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    workers = min(_cores(), memory // WORKER_MEMORY)
    return workers if workers > 1 else 0


def _cores() -> int:
    """The cores this process may use: its CPU affinity, within a container's CPU quota (cgroup v2 cpu.max)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


# The test files that take longest (about 60-130 s each on 2 cores, --durations), first. pytest-xdist hands out whole
# files in collection order (pyproject: --dist loadfile --no-loadscope-reorder), so these start first and the last
# files handed out are short ones: no process is left with two minutes of work while the other has none. The second
# and third build no engine that the first builds (the ONNX Runtime and TensorRT-RTX engines of the run), so that
# neither process starts by waiting on the other's lock.
LONGEST_FIRST = (
    "test_tensorrt_rtx.py", "test_quant.py", "test_build_jobs.py", "test_runner_contract.py", "test_aotinductor.py",
    "test_benchmark_headline.py", "test_parallel.py", "test_slim_vae_lowvram.py", "test_first_block_cache_engines.py",
    "test_benchmark_serve_gpu.py", "test_build_onnxruntime.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    """The longest test files first (``LONGEST_FIRST``); the others after them, in their own order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        # The cores shared out: each test process (and each process it starts) computes with its part of them, not
        # with as many threads as the host has cores, which the processes would then wait for in turn.
        threads = max(1, _cores() // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture
def sigint_handled():
    """SIGINT raising KeyboardInterrupt, as in a terminal, whatever the test run inherited (a script's background
    job starts with SIGINT ignored); the inherited disposition is put back afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def sigint_default() -> None:
    """``preexec_fn`` of a subprocess that must take SIGINT as a terminal's Ctrl-C, whatever this process ignores."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def tiny():
    """The tiny model, fp32 on the CPU."""
    from fluxtrt.models import load_components

    return load_components("tiny", "cpu", "fp32", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny):
    from fluxtrt.pipeline.kontext import KontextPipeline

    return KontextPipeline.from_components(tiny)


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (low-frequency noise, so resizing is meaningful)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 32, 2), max(width // 32, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "input.png"
    make_image(320, 240).save(path)
    return path


def run_cli(*args: str):
    """Invoke the real ``fluxtrt`` CLI in-process; stdout and stderr are kept apart."""
    from click.testing import CliRunner

    from fluxtrt.cli import main

    return CliRunner().invoke(main, list(args))


def one_error_line(result) -> str:
    """The single ``error:`` line a failed command must print (and its non-zero exit)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def cannot_run_engines(flavour) -> str | None:
    """Why this machine cannot run the engines of a TensorRT ``flavour`` (``fluxtrt.backends.tensorrt.flavour``):
    the library or the GPU it lacks; None where it can."""
    import importlib.util

    backend = flavour.backend
    if importlib.util.find_spec(flavour.module) is None:
        return f"{backend}: its library, the Python module {flavour.module}, is not installed ({flavour.install})"
    gpu = "a CUDA GPU"
    if flavour.runs_on:
        gpu += f" of compute capability {', '.join(f'{sm // 10}.{sm % 10}' for sm in flavour.runs_on)}"
    if not torch.cuda.is_available():
        return f"{backend}: {flavour.module} is installed but its engines build and run on {gpu}; there is no GPU here"
    major, minor = torch.cuda.get_device_capability()
    if flavour.runs_on and major * 10 + minor not in flavour.runs_on:
        return f"{backend}: {flavour.module} is installed but its runtime needs {gpu}; this one is {major}.{minor}"
    return None


# --- engines of the tiny model, built once per test run ------------------------------------------------------------


def run_dir(tmp_path_factory) -> Path:
    """A folder of this test run that every process of it sees: the run's base temporary folder, or under
    pytest-xdist the one above the workers' own (``<run>/popen-gwN``)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (made if missing) for the duration: one process at a time."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# AOTInductor build range: batch 1..2, each side 32..128 px (tuned for 64x64). GEOMETRIES lie inside it: square and
# non-square, target and reference of different sizes, batch 1 and 2.
AOTI_BATCH = (1, 1, 2)
AOTI_RESOLUTIONS = (Resolution(32, 32), Resolution(64, 64), Resolution(128, 128))
AOTI_GEOMETRIES = [(1, Resolution(64, 64), Resolution(64, 64)), (2, Resolution(96, 64), Resolution(32, 48))]
AOTI_OPTIONS = {"transformer": {"weights": "external"}}


class TinyAotiEngines:
    """AOTInductor engines of the tiny model, each built on first use into one directory (``root``; a new temporary
    one if not given).

    ``engines[name]`` is a loaded runner; ``entry(name)`` is what the build orchestration would record (the profile,
    the settings given and the backend's record). Each engine is built once per ``root``, by the first process that
    asks for it (under ``root/<name>.lock``); its entry is saved beside it (``<name>.entry.json``) for the others.
    """

    def __init__(self, components, root: Path | None = None):
        from fluxtrt.backends.aotinductor import AotInductorBackend
        from fluxtrt.specs import component_specs
        from fluxtrt.specs.flux import dims_from_components

        self.components = components
        self.dims = dims_from_components(components)
        self.specs = component_specs(self.dims)
        self.backend = AotInductorBackend()
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="fluxtrt-aoti-"))
            atexit.register(shutil.rmtree, root, True)
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, dict] = {}
        self._runners: dict = {}

    def path(self, name: str) -> Path:
        return self.root / f"{name}.pt2"

    def profile(self, name: str) -> dict:
        from fluxtrt.specs.flux import profile_shapes

        return profile_shapes(self.specs[name], self.dims, AOTI_BATCH, AOTI_RESOLUTIONS)

    def build_job(self, name: str, precision: str = "fp32", path: Path | None = None, module=None, **options):
        from fluxtrt.backends.base import BuildJob
        from fluxtrt.backends.torch_modules import component_module

        module = module if module is not None else component_module(name, self.components)
        return BuildJob(self.specs[name], module, None, path or self.path(name), precision, self.profile(name), "cpu",
                        self.root / "work", self.backend.options(options))  # fmt: skip

    def entry(self, name: str) -> dict:
        if name not in self._entries:
            saved = self.root / f"{name}.entry.json"
            with exclusive(self.root / f"{name}.lock"):
                if saved.exists():  # built by another process of this run
                    entry = json.loads(saved.read_text())
                    entry["record"] = self.backend.record_type.from_json(entry["record"])
                else:
                    entry = self._build(name)
                    staging = saved.with_suffix(".tmp")
                    staging.write_text(json.dumps({**entry, "record": entry["record"].to_json()}))
                    os.replace(staging, saved)
            self._entries[name] = entry
        return self._entries[name]

    def _build(self, name: str) -> dict:
        options = dict(AOTI_OPTIONS.get(name, {}))
        job = self.build_job(name, **options)
        with torch.inference_mode():  # as fluxtrt.engines.build runs backends
            record = self.backend.build(job)
        return {"profile": {k: [list(s) for s in v] for k, v in job.profile.items()}, "options": options,
                "record": record}  # fmt: skip

    def load_job(self, name: str, **changes):
        from fluxtrt.backends.base import LoadJob

        entry = {**self.entry(name), **changes}
        return LoadJob(self.specs[name], self.path(name), "cpu", torch.float32, entry["profile"],
                       self.backend.options(entry["options"]), entry["record"])  # fmt: skip

    def __getitem__(self, name: str):
        if name not in self._runners:
            self._runners[name] = self.backend.load(self.load_job(name))
        return self._runners[name]


@pytest.fixture(scope="session")
def aoti_engines(tiny, tmp_path_factory):
    return TinyAotiEngines(tiny, run_dir(tmp_path_factory) / "tiny-aoti")


ORT_MIN_RES = Resolution(256, 256)


def ort_config(out: Path, **kw):
    """``fluxtrt build --model tiny --backend onnxruntime --precision fp32 --min-resolution 256x256
    --opt-resolution 256x256 --max-batch 2`` (the opt size is where a benchmark times the engines)."""
    from fluxtrt.config import BuildConfig

    kw = {"opt_resolution": ORT_MIN_RES, **kw}
    return BuildConfig(model="tiny", backend="onnxruntime", precision="fp32", out=out, min_resolution=ORT_MIN_RES,
                       max_batch=2, **kw)  # fmt: skip


@pytest.fixture(scope="session")
def ort_engines(tmp_path_factory) -> Path:
    """All five tiny components built once for the test run with ONNX Runtime (an engines directory)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fluxtrt.engines.build import build_engines

    out = run_dir(tmp_path_factory) / "engines" / "tiny-ort"
    done = out.with_name("tiny-ort.done")
    with exclusive(out.with_name("tiny-ort.lock")):
        if not done.exists():  # else built by another process of this run
            report = build_engines(ort_config(out))
            assert [r.status for r in report.results] == ["built"] * 5
            done.touch()
    return out


def recorded_for(src: Path, dst: Path, only: Resolution) -> Path:
    """A copy of the engines directory ``src`` recorded as built for ``only`` (--min/--opt/--max-resolution), batch 1:
    its range and every engine's profile, which is all that differs between ONNX Runtime builds of other ranges
    (their engines take any shape; the runners enforce the recorded profiles)."""
    from fluxtrt.engines.manifest import BatchRange, Manifest, ResolutionRange
    from fluxtrt.specs import component_specs
    from fluxtrt.specs.flux import profile_shapes

    shutil.copytree(src, dst)
    manifest = Manifest.load(dst)
    manifest.resolutions = ResolutionRange(only, only, only)
    manifest.batch = BatchRange(1, 1, 1)
    specs = component_specs(manifest.dims)
    for name, entry in manifest.components.items():
        shapes = profile_shapes(specs[name], manifest.dims, (1, 1, 1), (only, only, only))
        entry.profile = {k: [list(s) for s in v] for k, v in shapes.items()}
    manifest.save(dst)
    return dst
