"""`fluxtrt build --jobs N`: components built at once in worker processes make the directory a build one after
another makes; progress and failures come back to the parent, which alone writes the manifest."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fluxtrt.errors
from fluxtrt.backends.onnxruntime import OnnxRuntimeBackend
from fluxtrt.config import SamplerConfig
from fluxtrt.engines import jobs
from fluxtrt.engines.build import build_engines
from fluxtrt.engines.load import load_engine_pipeline
from fluxtrt.engines.manifest import Manifest
from fluxtrt.errors import BuildError, InputError
from fluxtrt.specs import COMPONENTS
from tests.conftest import make_image, ort_config, sigint_default

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

STARTED = "building in worker process "
BUILT_HERE = "building in this process, from the model loaded here"


def worker_pids(said: list[tuple[str, str]]) -> dict[str, int]:
    """Component -> the pid of the worker process that built it, from the progress messages."""
    return {c: int(m.removeprefix(STARTED)) for c, m in said if m.startswith(STARTED)}


def hidden(out: Path) -> list[str]:
    """Staging folders and the lock: none may be left when a build has ended, however it ended."""
    return [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_jobs_2_builds_the_directory_jobs_1_builds(ort_engines, tmp_path, monkeypatch):
    # The tiny transformer counts as a large one: built by this process, from the model it loaded.
    monkeypatch.setattr(jobs, "BUILD_HERE_FROM", 0)
    out = tmp_path / "jobs2"
    said: list[tuple[str, str]] = []
    recorded_when_started: dict[str, set[str]] = {}

    def on_progress(component: str, message: str) -> None:
        said.append((component, message))
        if message.startswith(STARTED):
            recorded_when_started[component] = set(Manifest.load(out).components)

    built_here = []  # the build context of what this process built: it held the transformer, then let it go
    build_here = jobs._build_here
    monkeypatch.setattr(jobs, "_build_here", lambda build, plan: built_here.append(build) or build_here(build, plan))
    report = build_engines(ort_config(out, jobs=2), on_progress)
    assert [(r.name, r.status) for r in report.results] == [(c, "built") for c in COMPONENTS]
    assert len(built_here) == 1 and built_here[0].components is None
    ours, sequential = Manifest.load(out), Manifest.load(ort_engines)  # ort_engines: the same config, --jobs 1
    assert list(ours.components) == list(COMPONENTS)
    for name in COMPONENTS:
        a, b = ours.components[name], sequential.components[name]
        assert a.settings == b.settings and a.profile == b.profile and a.record == b.record, name
        assert a.onnx == b.onnx and a.engine == b.engine, name  # paths, sizes and sha256 of every file
    assert (ours.model, ours.resolutions, ours.batch) == (sequential.model, sequential.resolutions, sequential.batch)
    assert hidden(out) == []
    # The transformer was built first, in this process, from the model it had loaded (to read the model's
    # dimensions); each other component in a worker process: one beside it, two once it was done.
    pids = worker_pids(said)
    assert set(pids) == set(COMPONENTS) - {"transformer"}
    assert os.getpid() not in pids.values() and len(set(pids.values())) <= 2
    here = [i for i, (c, m) in enumerate(said) if m == BUILT_HERE]
    assert [said[i][0] for i in here] == ["transformer"]
    assert here[0] < min(i for i, (c, m) in enumerate(said) if m.startswith(STARTED))
    # The workers' progress was told as it happened, not when the build ended: when each one's start was told, the
    # manifest did not hold that component yet.
    assert recorded_when_started and not any(c in before for c, before in recorded_when_started.items())
    # The engines load and edit as the ones built one after another.
    sampler = SamplerConfig("euler", steps=2)
    images = []
    for root in (out, ort_engines):
        with load_engine_pipeline(root, "cpu") as pipeline:
            edit = pipeline.edit(make_image(256, 256), "make it blue", sampler=sampler, height=256, width=256,
                                 max_area=256 * 256, seed=3, auto_resize=False)  # fmt: skip
            images.append(np.asarray(edit.images[0]))
    assert np.array_equal(images[0], images[1]) and images[0].std() > 5


class TaggingBackend(OnnxRuntimeBackend):
    """ONNX Runtime that writes its tag into each engine's record: shows that the object passed to build_engines is
    the one the workers build with (it is pickled to them)."""

    def __init__(self, tag: str):
        self.tag = tag

    def build(self, job):
        record = super().build(job)
        record.extra["tag"] = self.tag  # a key the record does not declare: kept as it is
        return record


@pytest.fixture
def onnx_dir(ort_engines, tmp_path) -> Path:
    """An --onnx-dir holding the ONNX of a finished build; tests put a wrong graph in a component's folder."""
    path = tmp_path / "onnx-dir"
    shutil.copytree(ort_engines / "onnx", path)
    return path


def break_component(onnx_dir: Path, name: str, graph_of: str) -> None:
    """Put ``graph_of``'s graph in ``name``'s folder: importing it fails, its inputs are not ``name``'s."""
    shutil.rmtree(onnx_dir / name)
    shutil.copytree(onnx_dir / graph_of, onnx_dir / name)


def test_a_failing_component_fails_as_without_jobs_and_what_finished_stays_recorded(onnx_dir, tmp_path):
    break_component(onnx_dir, "t5", graph_of="clip")
    backend = TaggingBackend("given")
    components = ("t5", "vae_decoder")
    with pytest.raises(BuildError) as sequential:
        build_engines(ort_config(tmp_path / "seq", components=components, onnx_dir=onnx_dir), backend=backend)
    out = tmp_path / "jobs2"
    said: list[tuple[str, str]] = []
    with pytest.raises(BuildError) as parallel:
        build_engines(ort_config(out, components=components, onnx_dir=onnx_dir, jobs=2),
                      lambda c, m: said.append((c, m)), backend=backend)  # fmt: skip
    assert type(parallel.value) is type(sequential.value) and str(parallel.value) == str(sequential.value)
    assert str(sequential.value).startswith("t5: ") and "fluxtrt's input/output names" in str(sequential.value)
    assert worker_pids(said)["t5"] != os.getpid()
    # vae_decoder was under way in the other worker when t5 failed: it ran to its end and is recorded, files checked.
    manifest = Manifest.load(out)
    assert list(manifest.components) == ["vae_decoder"]
    entry = manifest.components["vae_decoder"]
    entry.engine.check(out, "vae_decoder")
    assert entry.record.extra == {"tag": "given"}
    assert not (out / "t5.onnx").exists() and not (out / "onnx" / "t5").exists()
    assert hidden(out) == []


def test_after_a_failure_no_further_component_starts(onnx_dir, tmp_path):
    break_component(onnx_dir, "t5", graph_of="clip")
    break_component(onnx_dir, "clip", graph_of="vae_decoder")
    components = ("t5", "clip", "vae_decoder")
    with pytest.raises(BuildError) as sequential:
        build_engines(ort_config(tmp_path / "seq", components=components, onnx_dir=onnx_dir))
    out = tmp_path / "jobs2"
    said: list[tuple[str, str]] = []
    with pytest.raises(BuildError) as parallel:
        build_engines(
            ort_config(out, components=components, onnx_dir=onnx_dir, jobs=2), lambda c, m: said.append((c, m))
        )
    # Both workers fail; the error raised is the first component's, as one after another.
    assert str(parallel.value) == str(sequential.value) and str(parallel.value).startswith("t5: ")
    assert sorted(worker_pids(said)) == ["clip", "t5"]  # vae_decoder never started
    assert {c for c, m in said if m.startswith("failed: ")} == {"t5", "clip"}
    assert Manifest.load(out).components == {}
    assert not (out / "vae_decoder.onnx").exists() and not (out / "onnx").exists() and hidden(out) == []


@pytest.mark.parametrize(("components", "workers"), [("clip,t5,vae_decoder", 2), ("transformer,clip,t5", 1)],
                         ids=["in-workers", "transformer-here"])  # fmt: skip
def test_ctrl_c_stops_every_worker_and_leaves_nothing_half_written(tmp_path, components, workers):
    """Ctrl-C in a terminal reaches the whole process group, the workers included; with the transformer it comes
    while the build process builds it (the model it loaded is there) and one worker builds another component."""
    out = tmp_path / "e"
    # fluxtrt's command, the tiny transformer counted as a large one (built by the build process).
    cli = "import sys, fluxtrt.engines.jobs as j, fluxtrt.cli as c; j.BUILD_HERE_FROM = 0; c.main(sys.argv[1:])"
    command = [sys.executable, "-c", cli, "build", "--model", "tiny", "--out", str(out), "--components",
               components, "--min-resolution", "256x256", "--jobs", "2"]  # fmt: skip
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=sigint_default)  # fmt: skip
    lines, exporting = [], set()
    try:
        while len(exporting) < 2:  # both builds are exporting
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
            if line.split()[2:] == ["exporting", "ONNX"]:  # "HH:MM:SS component: exporting ONNX"
                exporting.add(line.split()[1])
        os.killpg(proc.pid, signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = "".join(lines) + rest
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted: nothing half-written was left")
    pids = [int(line.rsplit(" ", 1)[1]) for line in lines if STARTED in line]
    # (With the transformer here, a fast machine may finish it before the signal: t5 then starts a second worker.)
    assert workers <= len(pids) <= 2 and proc.pid not in pids
    assert any(line.endswith(f"transformer: {BUILT_HERE}\n") for line in lines) == (workers == 1)
    for pid in pids:  # the workers ended with their parent (a zombie would read "Z")
        state = Path(f"/proc/{pid}/stat")
        assert not state.exists() or state.read_text().split(") ")[1][0] == "Z", pid
    assert hidden(out) == []
    manifest = Manifest.load(out)
    for name, entry in manifest.components.items():  # one may have finished before the signal: then it is whole
        entry.engine.check(out, name)
    assert {p.stem for p in out.glob("*.onnx")} == set(manifest.components)


def test_jobs_must_be_a_positive_integer(tmp_path):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match=rf"--jobs is {bad!r}, expected auto or an integer >= 1 .*--jobs 1"):
            ort_config(tmp_path / "e", jobs=bad)


def test_a_backend_that_does_not_pickle_is_refused_before_anything_loads(tmp_path):
    class LocalBackend(OnnxRuntimeBackend):  # a local class pickles by a name no other process can import
        pass

    with pytest.raises(InputError, match="LocalBackend does not pickle.*--jobs 2 worker processes"):
        build_engines(ort_config(tmp_path / "e", jobs=2), backend=LocalBackend())
    assert not (tmp_path / "e").exists()


ERRORS = [c for c in vars(fluxtrt.errors).values() if isinstance(c, type) and issubclass(c, Exception)]


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_error_crosses_to_the_parent_unchanged(cls):
    """A worker's error reaches the parent pickled: each class comes back with its type, message and fields."""
    if cls is fluxtrt.errors.MissingDependencyError:
        error = cls("onnx", "ONNX export", "pip install onnx")
    else:
        error = cls("what failed, the value seen, what was expected: the fix")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls and str(back) == str(error) and vars(back) == vars(error)


def test_a_worker_raises_ctrl_c_once_so_its_cleanup_runs_to_the_end(sigint_handled):
    """A worker gets SIGINT from the terminal and from its parent: the second must not cut the first's cleanup."""
    from fluxtrt.engines.interrupt import watch_interrupts

    cleaned = False
    with watch_interrupts(once=True) as interrupts:
        with pytest.raises(KeyboardInterrupt):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs here
            finally:
                os.kill(os.getpid(), signal.SIGINT)  # the second one, during the cleanup
                time.sleep(0.1)
                cleaned = True
        assert cleaned and interrupts.seen
        with pytest.raises(KeyboardInterrupt):  # a swallowed first one is still raised at the next step
            interrupts.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_process_started_with_sigint_ignored_keeps_ignoring_it():
    """A script's background job (SIGINT ignored, as the shell starts it) is not stopped by the terminal's Ctrl-C;
    a build worker, which ignores SIGINT between builds itself, handles it within a build unless told otherwise."""
    from fluxtrt.engines.interrupt import watch_interrupts

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with watch_interrupts() as interrupts:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            interrupts.check()  # nothing arrived
        assert not interrupts.seen and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        with watch_interrupts(once=True, ignored=False) as interrupts, pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert interrupts.seen and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
