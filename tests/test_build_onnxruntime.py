"""`fluxtrt build --backend onnxruntime`: ONNX export parity, the engines directory, skipping, robustness."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxtrt.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeRecord
from fluxtrt.config import BuildConfig
from fluxtrt.engines.build import build_engines
from fluxtrt.engines.load import load_engine_pipeline
from fluxtrt.engines.manifest import FORMAT, Manifest
from fluxtrt.errors import EngineError, InputError
from fluxtrt.specs import COMPONENTS, Resolution, component_specs
from fluxtrt.specs.flux import component_dims, dims_from_components
from tests.conftest import ORT_MIN_RES, make_image, one_error_line, ort_config, recorded_for, run_cli

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MIN_RES = ORT_MIN_RES
tiny_config = ort_config


@pytest.fixture(scope="module")
def engines(ort_engines) -> Path:
    """All five tiny components, built once for the session."""
    return ort_engines


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- 1. per-component parity, one export, two geometries and batch sizes ------------------------------------------


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_parity_with_torch(tiny, engines, name):
    from fluxtrt.backends.torch_runner import torch_runners

    ort_runner = load_engine_pipeline(engines, "cpu").runners[name]
    torch_runner = torch_runners(tiny)[name]
    dims = dims_from_components(tiny)
    tol = torch_runner.spec.tolerance["fp32"]
    geometries = [(1, Resolution(256, 256), Resolution(256, 256)), (2, Resolution(384, 272), Resolution(272, 400))]
    for batch, target, reference in geometries:
        feed = torch_runner.spec.sample_feed(component_dims(name, dims, batch, target, reference), torch.float32)
        ours, ref = ort_runner.infer(feed), torch_runner.infer(feed)
        for key in ref:
            assert ours[key].shape == ref[key].shape
            torch.testing.assert_close(ours[key], ref[key], atol=tol.atol, rtol=tol.rtol)


def test_onnx_has_spec_interface_and_symbolic_axes(engines):
    import onnx

    model = onnx.load(str(engines / "onnx" / "transformer" / "model.onnx"), load_external_data=False)
    assert model.opset_import[0].version == 19
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["hidden_states"] == ["B", "S", 64]
    assert dims["img_ids"] == ["S", 3]
    assert dims["txt_ids"] == [512, 3]


# --- 2. end to end: engines edit == torch edit ---------------------------------------------------------------------


def test_infer_from_engines_matches_torch(engines, tiny, tmp_path):
    """`fluxtrt infer --engines` writes the image the tiny model's pipeline makes. The engines are recorded for one
    size (``recorded_for``), 512x384, so the 400x300 photo's ~1 MP geometry (1184x880) is made 512x384 (ONNX Runtime
    keeps every session's memory, several GB each at 1 MP); the pipeline is given the same sizes."""
    from fluxtrt.config import SamplerConfig
    from fluxtrt.pipeline.image import load_image
    from fluxtrt.pipeline.kontext import KontextPipeline
    from fluxtrt.pipeline.sizes import SizeRange

    size = Resolution(512, 384)
    recorded = recorded_for(engines, tmp_path / "engines", size)
    src = tmp_path / "in.png"
    make_image(400, 300).save(src)
    result = run_cli("infer", "--engines", str(recorded), "--out", str(tmp_path / "engines.png"), "--image", str(src),
                     "--prompt", "make the house blue", "--steps", "3", "--seed", "5", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    oracle = KontextPipeline.from_components(tiny)
    oracle.sizes = SizeRange(size, size)
    want = oracle.edit(load_image(src)[0], "make the house blue", sampler=SamplerConfig(steps=3), seed=5)
    assert (want.target, want.reference) == (size, size)
    a = np.asarray(Image.open(tmp_path / "engines.png"), dtype=np.int16)
    b = np.asarray(want.images[0], dtype=np.int16)
    assert a.shape == b.shape == (size.height, size.width, 3)
    assert np.abs(a - b).max() <= 2
    assert b.std() > 5  # a real image, not a constant


def test_inspect_shows_the_manifest_on_stdout_uncut(engines, tmp_path):
    """`fluxtrt inspect DIR > info.txt` keeps the tables: they go to stdout, as wide as they need when piped (a long
    directory name is not cut to "…"); nothing goes to stderr."""
    long_dir = tmp_path / ("engines-with-a-directory-name-longer-than-any-terminal-" + "x" * 60)
    shutil.copytree(engines, long_dir)
    result = run_cli("inspect", str(long_dir))
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    for text in ("onnxruntime", "fp32", "transformer", "1568x1568", "tiny", str(long_dir), *COMPONENTS):
        assert text in result.stdout
    assert "…" not in result.stdout
    line = one_error_line(run_cli("inspect", str(tmp_path / "nowhere")))
    assert "ENGINES_DIR" in line and "--engines" not in line and "--model MODEL" in line


# --- skipping and partial rebuilds ---------------------------------------------------------------------------------


def test_rebuild_skips_matching_and_rebuilds_only_affected(engines, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(engines, out)
    before = snapshot(out)
    report = build_engines(tiny_config(out))
    assert [r.status for r in report.results] == ["up to date"] * 5
    assert snapshot(out) == before
    # A new resolution range changes the image components' profiles, not the text encoders'. (What is rebuilt takes
    # its ONNX from the session's build, as --onnx-dir does: the decision to rebuild is what is tested here.)
    onnx = {"onnx_dir": engines / "onnx"}
    report = build_engines(tiny_config(out, max_resolution=Resolution(1024, 1024), opt_resolution=Resolution(512, 512),
                                       **onnx))  # fmt: skip
    status = {r.name: r.status for r in report.results}
    assert status == {"clip": "up to date", "t5": "up to date", "vae_encoder": "built", "transformer": "built",
                      "vae_decoder": "built"}  # fmt: skip
    assert Manifest.load(out).resolutions.max == Resolution(1024, 1024)
    # --force rebuilds everything.
    report = build_engines(tiny_config(out, components=("clip",), force=True, **onnx))
    assert [r.status for r in report.results] == ["built"]


# --- 3. external data ----------------------------------------------------------------------------------------------


def test_external_data_path(tiny, tmp_path):
    from fluxtrt.backends.base import BuildJob, LoadJob
    from fluxtrt.backends.torch_modules import component_module
    from fluxtrt.backends.torch_runner import torch_runners
    from fluxtrt.export.onnx import export_onnx

    runner = torch_runners(tiny)["t5"]
    spec = runner.spec
    feed = spec.sample_feed({"B": 2}, torch.float32)
    (tmp_path / "onnx").mkdir()
    exported = export_onnx(spec, component_module("t5", tiny), feed, tmp_path / "onnx", external_data_threshold=0)
    assert exported.data is not None and exported.data.name == "model.onnx_data"
    assert exported.data.stat().st_size > exported.initializer_bytes * 0.9  # the weights live in the data file
    assert exported.model.stat().st_size < exported.data.stat().st_size / 10
    # Each step of the export is timed, and the steps account for the whole.
    assert list(exported.phases) == ["export", "translate", "optimize", "save", "check"]
    assert sum(exported.phases.values()) == pytest.approx(exported.seconds, rel=0.05)
    (tmp_path / "engine").mkdir()
    backend = OnnxRuntimeBackend()
    engine = tmp_path / "engine" / "t5.onnx"
    profile = {"input_ids": [[1, 512], [2, 512], [2, 512]]}
    record = backend.build(BuildJob(spec, None, exported.model, engine, "fp32", profile, "cpu", tmp_path,
                                    backend.options({})))  # fmt: skip
    assert (tmp_path / "engine" / "t5.onnx_data").is_file() and record.external_data == "t5.onnx_data"
    loaded = backend.load(LoadJob(spec, engine, "cpu", torch.float32, profile, backend.options({}), record))
    torch.testing.assert_close(loaded.infer(feed)["text_embeds"], runner.infer(feed)["text_embeds"],
                               atol=1e-4, rtol=1e-4)  # fmt: skip


# --- 4. robustness --------------------------------------------------------------------------------------------------


@pytest.fixture
def engines_copy(engines, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(engines, out)
    return out


def infer_args(engines: Path, tmp_path: Path) -> list[str]:
    src = tmp_path / "in.png"
    make_image(200, 200).save(src)
    return ["infer", "--engines", str(engines), "--image", str(src), "--prompt", "p", "--out", str(tmp_path / "o.png"),
            "--steps", "1", "--device", "cpu"]  # fmt: skip


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_engine_is_one_clear_error(engines_copy, tmp_path, damage):
    engine = engines_copy / "transformer.onnx"
    data = engine.read_bytes()
    if damage == "corrupt":  # same size, flipped bytes in the middle (weights): only the hash can tell
        mid = len(data) // 2
        engine.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :])
    elif damage == "truncate":
        engine.write_bytes(data[: len(data) // 3])
    else:
        engine.unlink()
    line = one_error_line(run_cli(*infer_args(engines_copy, tmp_path)))
    assert "transformer" in line and "rebuild" in line
    assert not (tmp_path / "o.png").exists()


def test_corrupt_onnx_engine_file_with_matching_record_is_refused_by_onnxruntime(engines_copy):
    """A file that is not ONNX at all (manifest updated to match it) fails in ONNX Runtime's loader, clearly."""
    from fluxtrt.engines.manifest import FileRecord

    engine = engines_copy / "clip.onnx"
    engine.write_bytes(b"not an onnx model" * 100)
    manifest = Manifest.load(engines_copy)
    manifest.components["clip"].engine = FileRecord.of(engines_copy, engine)
    manifest.save(engines_copy)
    with pytest.raises(EngineError, match="ONNX Runtime cannot load .*clip.onnx") as info:
        load_engine_pipeline(engines_copy, "cpu")
    assert "tokenizer" not in str(info.value)  # the tokenizers beside it are fine


def test_unreadable_tokenizers_beside_good_engines_are_named(engines_copy):
    (engines_copy / "tokenizer_2" / "tokenizer.json").write_text("{ not json")
    with pytest.raises(EngineError, match="the tokenizers beside the engines cannot be read") as info:
        load_engine_pipeline(engines_copy, "cpu")
    assert ".onnx" not in str(info.value)


@pytest.mark.parametrize("case", ["missing", "unparsable", "other backend", "other format", "no directory"])
def test_bad_manifest_is_one_clear_error(engines_copy, tmp_path, case):
    path = engines_copy / "manifest.json"
    target = engines_copy
    if case == "missing":
        path.unlink()
    elif case == "unparsable":
        path.write_text("{ not json")
    elif case == "other backend":
        raw = json.loads(path.read_text())
        raw["backend"] = "openvino"
        path.write_text(json.dumps(raw))
    elif case == "other format":
        raw = json.loads(path.read_text())
        raw["format"] = 99
        path.write_text(json.dumps(raw))
    else:
        target = tmp_path / "nowhere"
    line = one_error_line(run_cli(*infer_args(target, tmp_path)))
    assert {"missing": "manifest.json", "unparsable": "not a valid", "other backend": "openvino",
            "other format": "format 99", "no directory": "not a directory"}[case] in line  # fmt: skip
    if case == "unparsable":  # the fix is a command that works: it names --model
        assert "`fluxtrt build --model MODEL --out " in line and "--force" in line
    if case == "other format":  # the model, backend and precision the manifest records
        assert "`fluxtrt build --model tiny --backend onnxruntime --precision fp32 " in line and "--force`" in line


def test_build_into_other_precision_or_backend_is_refused_and_loses_nothing(engines_copy):
    before = snapshot(engines_copy)
    with pytest.raises(EngineError, match="holds onnxruntime fp32 engines"):
        build_engines(BuildConfig(model="tiny", backend="onnxruntime", precision="bf16", out=engines_copy))
    result = run_cli("build", "--model", "tiny", "--precision", "bf16", "--out", str(engines_copy))
    assert "holds onnxruntime fp32 engines" in one_error_line(result)
    assert snapshot(engines_copy) == before


def test_resolution_outside_built_range(engines_copy, tmp_path):
    """The runners enforce the profiles the engines were built with; the pipeline checks a whole edit before it
    starts, so an edit that does not fit fails at once with one line naming the geometry, the range and the fix."""
    from fluxtrt.specs.flux import profile_shapes

    manifest = Manifest.load(engines_copy)
    specs = component_specs(manifest.dims)
    for name, entry in manifest.components.items():  # as if built with --max-resolution 768x768
        shapes = profile_shapes(specs[name], manifest.dims, (1, 1, 2), (MIN_RES, MIN_RES, Resolution(768, 768)))
        entry.profile = {k: [list(s) for s in v] for k, v in shapes.items()}
    manifest.save(engines_copy)
    line = one_error_line(run_cli(*infer_args(engines_copy, tmp_path)))
    assert "1024x1024 edit" in line and "built for H in [256, 768]" in line and "--max-resolution" in line
    fix = "B is 3 but the engine was built for B in .1, 2.: rebuild with --max-batch"
    with load_engine_pipeline(engines_copy, "cpu") as pipeline, pytest.raises(InputError, match=fix):
        pipeline.check_fits(3, Resolution(512, 512), Resolution(512, 512))


class InterruptingBackend(OnnxRuntimeBackend):
    """ONNX Runtime, but the build of one component is interrupted midway (as Ctrl-C would)."""

    def __init__(self, interrupt: str):
        self.interrupt = interrupt

    def build(self, job):
        if job.spec.name == self.interrupt:
            job.engine_path.write_bytes(b"half an engine")
            raise KeyboardInterrupt
        return super().build(job)


def test_interrupted_build_leaves_nothing_half_written(engines, tmp_path):
    out = tmp_path / "eng"
    config = tiny_config(out, components=("clip", "t5"), onnx_dir=engines / "onnx")  # the session build's ONNX
    with pytest.raises(KeyboardInterrupt):
        build_engines(config, backend=InterruptingBackend("t5"))
    manifest = Manifest.load(out)
    assert list(manifest.components) == ["clip"]
    assert not (out / "t5.onnx").exists() and not (out / "onnx" / "t5").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    clip_before = (out / "clip.onnx").read_bytes()
    # A build killed outright leaves a staging folder; it never carries a finished name and the next build clears it.
    (out / ".staging-t5-99999").mkdir()
    report = build_engines(config)
    assert {r.name: r.status for r in report.results} == {"clip": "up to date", "t5": "built"}
    assert (out / "clip.onnx").read_bytes() == clip_before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


class SwallowingBackend(OnnxRuntimeBackend):
    """ONNX Runtime, but Ctrl-C arrives during one component's build inside code that swallows it, as a weakref
    callback does ("Exception ignored in: ... KeyboardInterrupt"), and the build then finishes normally."""

    def __init__(self, interrupt: str):
        self.interrupt = interrupt

    def build(self, job):
        if job.spec.name == self.interrupt:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs here
            except KeyboardInterrupt:
                pass
        return super().build(job)


def test_swallowed_ctrl_c_still_stops_the_build(tmp_path, sigint_handled):
    out = tmp_path / "eng"
    with pytest.raises(KeyboardInterrupt):
        build_engines(tiny_config(out, components=("clip", "t5")), backend=SwallowingBackend("clip"))
    assert not (out / "clip.onnx").exists() and list(Manifest.load(out).components) == []
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging folder, no lock
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_is_exit_130_and_one_line(tmp_path, monkeypatch):
    import fluxtrt.engines.build

    monkeypatch.setattr(fluxtrt.engines.build, "get_backend", lambda name: InterruptingBackend("clip"))
    result = run_cli("build", "--model", "tiny", "--components", "clip", "--out", str(tmp_path / "e"))
    assert result.exit_code == 130
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # after the progress lines
    assert len(errors) == 1 and errors[0].startswith("error: interrupted: nothing half-written was left")
    assert result.stderr.strip().splitlines()[-1] == errors[0]


def test_second_build_into_the_same_directory_is_refused_naming_the_holder(tmp_path):
    from fluxtrt.engines.lock import build_lock

    out = tmp_path / "eng"
    said = []
    with build_lock(out, lambda *m: said.append(m)):
        info = json.loads((out / ".lock").read_text())
        with pytest.raises(EngineError, match=rf"being built by another fluxtrt build \(pid {os.getpid()} on "):
            build_engines(tiny_config(out, components=("clip",)))
        result = run_cli("build", "--model", "tiny", "--out", str(out))  # a range with every preferred size: no notice
        line = one_error_line(result)
        assert f"pid {info['pid']} on {info['host']}, started " in line and "wait for it" in line
    assert said == [] and not out.exists()  # the lock made the folder; leaving removed both
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = one_error_line(run_cli("build", "--model", "tiny", "--out", str(a_file / "engines")))
    assert f"--out '{a_file / 'engines'}' cannot be written" in line


def test_lock_of_a_dead_build_is_taken_over(tmp_path):
    out = tmp_path / "eng"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": "h", "started": 0, "command": "fluxtrt build"}))
    said = []
    report = build_engines(tiny_config(out, components=("clip",)), lambda c, m: said.append(f"{c}: {m}"))
    assert [r.status for r in report.results] == ["built"]
    assert any(line.startswith("lock: took over") and f"pid {dead.pid} on h" in line for line in said), said
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_build_prints_results_on_stdout_and_timed_progress_on_stderr(engines_copy):
    result = run_cli("build", "--model", "tiny", "--out", str(engines_copy), "--min-resolution", "256x256",
                     "--opt-resolution", "256x256", "--max-batch", "2")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("up to date") == len(COMPONENTS) and str(engines_copy) in result.stdout
    progress = [line for line in result.stderr.splitlines() if line.strip()]
    assert progress and all(re.match(r"\d\d:\d\d:\d\d \S+: ", line) for line in progress), progress
    assert ".py:" not in result.stderr and "up to date" not in result.stdout.split("\n")[0]


def test_build_report_shows_no_onnx_size_for_a_backend_without_onnx(capsys):
    from dataclasses import replace

    from fluxtrt.console import print_build_report
    from fluxtrt.engines.build import BuildReport
    from fluxtrt.engines.plan import ComponentResult

    tiny_manifest = json.loads((Path(__file__).parent / "data" / "manifests" / "format2.json").read_text())
    manifest = replace(Manifest.from_json(tiny_manifest), backend="aotinductor", components={})
    results = [ComponentResult("clip", "built", 1.0, 0, 2**21), ComponentResult("t5", "built", 1.0, 2**20, 2**21)]
    print_build_report(BuildReport(Path("e"), manifest, results))
    rows = {line.split("│")[1].strip(): line.split("│")[4].strip() for line in capsys.readouterr().out.splitlines()
            if line.count("│") > 4 and "component" not in line}  # fmt: skip
    assert rows == {"clip": "-", "t5": "1.0"}


def test_build_into_foreign_directory_is_refused(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(EngineError, match="not empty and has no manifest.json"):
        build_engines(tiny_config(out, components=("clip",)))
    assert os.listdir(out) == ["holiday.jpg"]


def test_backend_options_reach_the_build_settings(tmp_path):
    config = tiny_config(tmp_path / "e", options={"weights": "external", "workspace_gib": 4.0})
    assert config.backend_options() == {"weights": "external", "workspace_gib": 4.0}
    assert tiny_config(tmp_path / "e").backend_options() == {}
    # A backend refuses the options of another, before loading anything.
    with pytest.raises(InputError, match="--aoti-weights is not an option of the onnxruntime backend"):
        build_engines(config)
    assert not (tmp_path / "e").exists()


def test_fp8_attention_on_a_cpu_build_is_one_line(tmp_path):
    result = run_cli("build", "--model", "tiny", "--out", str(tmp_path / "e"), "--backend", "aotinductor",
                     "--components", "transformer", "--aoti-fp8-attention")  # fmt: skip
    # Progress lines come first; the failure is one error line, the last.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code != 0 and len(errors) == 1, result.stderr
    assert "FP8 attention is unavailable on cpu" in errors[0] and "--device cuda" in errors[0]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert not list(tmp_path.rglob("*.pt2"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--backend", "openvino"], "--backend is 'openvino'"),
        (["--precision", "int4"], "--precision is 'int4'"),
        (["--components", "clip,unet"], "--components is 'unet'"),
        (["--min-resolution", "2048x2048"], "not ordered"),
        (["--max-resolution", "big"], "--max-resolution is 'big'"),
        (["--max-batch", "0"], "--max-batch is 0"),
        (["--jobs", "0"], "--jobs is 0, expected auto or an integer >= 1"),
        (["--jobs", "many"], "--jobs is 'many', expected auto or an integer >= 1"),
        (["--aoti-weights", "bogus"], "--aoti-weights is 'bogus'"),
    ],
)
def test_build_bad_options_one_line(tmp_path, args, needle):
    result = run_cli("build", "--model", "tiny", "--out", str(tmp_path / "e"), *args)
    assert needle in one_error_line(result)
    assert not (tmp_path / "e").exists()


# --- engines in `fluxtrt compare` ------------------------------------------------------------------------------------


def test_compare_reports_engine_timings_and_per_step_error(engines, tmp_path):
    from fluxtrt.bench.compare import compare
    from fluxtrt.bench.config import CompareConfig
    from fluxtrt.bench.contenders import EngineContender, StageContender
    from fluxtrt.config import SamplerConfig

    config = CompareConfig(model="tiny", stages=("0",), engines=(engines,), report_dir=tmp_path / "r", runs=1,
                           warmup=0, device="cpu", dtype="fp32", resolution=Resolution(256, 256))  # fmt: skip
    contenders = [
        StageContender("0:steps=3"),
        EngineContender(engines, sampler=SamplerConfig("euler", "flux-shift", 3)),
    ]
    report = compare(config, contenders=contenders)
    engine_row = report.contenders[1]
    assert engine_row.status == "ok", engine_row.error
    error = engine_row.details["step_error"]
    assert error["steps"] == 3 and error["precision"] == "fp32" and error["reference"] == "fp32"
    assert 0 < error["max_rel_l2"] < 1e-4  # fp32 ONNX Runtime against fp32 PyTorch on identical inputs
    # Same model, sampler and seed as stage 0 with 3 Euler steps: the engines' latents follow stage 0's.
    assert engine_row.runs[0].fidelity["latent_cosine"] > 0.9999
    assert "per-step transformer error" in (tmp_path / "r" / "report.md").read_text()
    assert "(fp32, against PyTorch fp32)" in (tmp_path / "r" / "report.md").read_text()


def test_manifest_of_format_1_is_read(engines_copy):
    """Format 1 kept the backend's record and the settings given in one field, "options"; it loads as this format."""
    path = engines_copy / "manifest.json"
    raw = json.loads(path.read_text())
    raw["format"] = 1
    for entry in raw["components"].values():
        entry["options"] = entry.pop("record")
    path.write_text(json.dumps(raw))
    manifest = Manifest.load(engines_copy)
    assert manifest.format == FORMAT
    assert manifest.components["clip"].record == OnnxRuntimeRecord(graph_optimization="basic", external_data=None)
    with load_engine_pipeline(engines_copy, "cpu") as pipeline:
        assert set(pipeline.runners) == set(COMPONENTS)


def test_compare_times_engines_warm_as_infer_runs_them(engines, tmp_path, monkeypatch):
    """compare's timed edits of an engines directory meet warm ONNX Runtime sessions, as `infer --engines`'s pipeline
    runs them once it has edited: a session takes three calls at a shape to reach its speed, and with one warmup edit
    the first timed edit still met cold sessions (7x the second edit on this model, and engines looked several times
    slower than they run). Counted on the pipeline `infer` loads: before the first timed edit, the transformer ran at
    least three times at the shape of every timed step. (A one-shot `infer` is one cold edit: its step costs more.)"""
    import fluxtrt.engines.load
    from fluxtrt.bench.compare import compare
    from fluxtrt.bench.config import CompareConfig
    from fluxtrt.bench.contenders import EngineContender
    from fluxtrt.config import SamplerConfig

    calls: list[tuple[str, tuple[int, ...]]] = []  # (phase, the transformer's hidden_states shape), in call order
    phase = ["warmup"]

    class CountingRunner:
        """The loaded transformer runner, its calls counted by shape (it computes what it computed)."""

        def __init__(self, runner):
            self.runner = runner

        def infer(self, feed):
            calls.append((phase[0], tuple(feed["hidden_states"].shape)))
            return self.runner.infer(feed)

        def __getattr__(self, name):
            return getattr(self.runner, name)

    load = fluxtrt.engines.load.load_engine_pipeline

    def counted_load(*args, **kwargs):
        pipeline = load(*args, **kwargs)
        pipeline.runners["transformer"] = CountingRunner(pipeline.runners["transformer"])
        return pipeline

    def on_event(event):
        if event["event"] == "warmup" and event["i"] == config.warmup - 1:
            phase[0] = "timed"
        elif event["event"] == "run" and event["run"] == config.runs - 1:
            phase[0] = "after"

    monkeypatch.setattr(fluxtrt.engines.load, "load_engine_pipeline", counted_load)
    image = tmp_path / "in.png"
    make_image(400, 300).save(image)
    sampler = SamplerConfig("dpmpp-2m", steps=4)
    size = Resolution(256, 256)
    engines = recorded_for(engines, tmp_path / "engines", size)  # the reference made 256x256 too, not ~1 MP
    config = CompareConfig(model="tiny", stages=(), engines=(engines,), image=image, runs=2, device="cpu",
                           resolution=size)  # fmt: skip
    report = compare(config, contenders=[EngineContender(engines, sampler=sampler)], on_event=on_event)
    runs = report.contenders[0].runs
    assert report.contenders[0].status == "ok", report.contenders[0].error
    assert [r.steps for r in runs] == [4, 4] and runs[0].image.size == (size.width, size.height)
    timed = [shape for p, shape in calls if p == "timed"]
    assert len(timed) == 2 * 4, calls
    before = [shape for p, shape in calls if p == "warmup"]
    for shape in set(timed):
        assert before.count(shape) >= 3, (shape, calls)


def test_sessions_compute_with_the_threads_torch_does(ort_engines):
    """An engine's ONNX Runtime session takes PyTorch's thread count (OMP_NUM_THREADS, torch.set_num_threads), not
    ONNX Runtime's default of every core."""
    from fluxtrt.backends.onnxruntime.runtime import session

    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ort_session = session(ort_engines / "clip.onnx", "cpu")
            assert ort_session.get_session_options().intra_op_num_threads == threads
    finally:
        torch.set_num_threads(before)


def test_device_auto_with_engines_is_where_they_run(engines, engines_copy, tmp_path):
    """``--device auto`` with ``--engines``: TensorRT plans run on CUDA wherever they were built, other engines on
    the device their directory was built for; engines built for the CPU run there also on a machine with a GPU."""
    from fluxtrt.config import InferConfig
    from fluxtrt.engines.load import engines_device
    from fluxtrt.infer import run_device

    assert engines_device(engines) == "cpu"
    manifest = Manifest.load(engines_copy)
    for backend, built, runs in (("tensorrt-rtx", "cpu", "cuda"), ("aotinductor", "cuda", "cuda"),
                                 ("onnxruntime", "cpu", "cpu")):  # fmt: skip
        replace(manifest, backend=backend, build_env=replace(manifest.build_env, device=built)).save(engines_copy)
        assert engines_device(engines_copy) == runs, backend
    assert engines_device(tmp_path / "missing") is None  # the load says what is wrong with it
    image, out = tmp_path / "in.png", tmp_path / "o.png"
    make_image(64, 64).save(image)
    config = InferConfig(model=None, engines=engines_copy, image=image, prompt="p", out=out)
    assert config.device == "auto" and run_device(config) == "cpu"
    assert run_device(replace(config, device="cuda")) == "cuda"  # as given
