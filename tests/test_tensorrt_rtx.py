"""TensorRT-RTX engines built for real on this CPU-only machine, and the ONNX-only build (``--backend onnx``).

Builds: all five tiny components at fp32 (from the ONNX Runtime build's ONNX) and at bf16; an ONNX-only fp8 directory
(BF16 text encoders and VAE, FP8 Q/DQ transformer with its calibration), from which ``--onnx-dir`` builds the FP8
transformer; the same for NVFP4.
Each quantized plan's parsed network is checked against the calibration's quantized linears: one quantize layer in
front of every one and an FP8 (FP4) matrix multiply behind it. Running a plan needs a supported GPU (8.0, 8.6, 8.9,
12.0, 12.1); here a plan cannot even be deserialized ("CUDA driver version is insufficient"), so the per-layer
inspection of built engines is skipped with that reason, and loading is checked up to the point a GPU is needed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fluxtrt.backends.tensorrt.flavour import TENSORRT_RTX
from fluxtrt.config import BuildConfig
from fluxtrt.errors import BuildError, DeviceError, EngineError, InputError
from fluxtrt.specs import COMPONENTS, Resolution
from tests.conftest import cannot_run_engines, make_image, one_error_line, run_cli

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install 'fluxtrt[tensorrt-rtx]')")
pytest.importorskip("onnxscript")

RANGE = {"min_resolution": Resolution(256, 256), "opt_resolution": Resolution(256, 256),
         "max_resolution": Resolution(512, 512)}  # fmt: skip
FAST_CALIBRATION = {"calibration_edits": 1}


def build(out: Path, backend: str = "tensorrt-rtx", precision: str = "fp32", said: list | None = None, **kw):
    """``fluxtrt build`` of the tiny model; its progress messages appended to ``said`` as (component, message)."""
    from fluxtrt.engines.build import build_engines

    config = BuildConfig(model="tiny", backend=backend, precision=precision, out=out, **RANGE, **kw)
    return build_engines(config, None if said is None else lambda component, message: said.append((component, message)))


@pytest.fixture(scope="module")
def rtx(tmp_path_factory, ort_engines) -> Path:
    """fp32 and bf16 TensorRT-RTX builds of all five components, and fp8/fp4 transformers from ONNX-only dirs.

    Each ONNX is exported once: the fp32 plans are built from the session's ONNX Runtime build's ONNX (the same
    export: fp32, the same smallest resolution), the bf16 build exports its own, and the fp8 ONNX-only directory
    takes the text encoders and VAE from it (what an fp8 build exports for them: bf16) beside its FP8 transformer.
    """
    root = tmp_path_factory.mktemp("rtx")
    said: list[tuple[str, str]] = []
    build(root / "fp32", onnx_dir=ort_engines / "onnx", said=said)
    (root / "fp32-progress.json").write_text(json.dumps(said))
    build(root / "bf16", precision="bf16")
    others = tuple(c for c in COMPONENTS if c != "transformer")
    build(root / "onnx-fp8", backend="onnx", precision="fp8", onnx_dir=root / "bf16" / "onnx", components=others)
    build(root / "onnx-fp8", backend="onnx", precision="fp8", components=("transformer",), **FAST_CALIBRATION)
    build(root / "fp8", precision="fp8", onnx_dir=root / "onnx-fp8" / "onnx", components=("transformer",))
    build(root / "onnx-fp4", backend="onnx", precision="fp4", components=("transformer",), **FAST_CALIBRATION)
    build(root / "fp4", precision="fp4", onnx_dir=root / "onnx-fp4" / "onnx", components=("transformer",))
    return root


def manifest(path: Path):
    from fluxtrt.engines.manifest import Manifest

    return Manifest.load(path)


def test_the_builders_phases_are_told_as_they_end(rtx):
    """Each plan's build tells TensorRT-RTX's own "Building engine" phase when it ends, once, after fluxtrt's
    "building" line, with a time within the component's build time (and any nested phase of a second or more)."""
    said = json.loads((rtx / "fp32-progress.json").read_text())
    m = manifest(rtx / "fp32")
    for name in COMPONENTS:
        told = [message for component, message in said if component == name]
        phases = told[told.index("building tensorrt-rtx engine") + 1 :]
        assert phases and all(p.startswith("TensorRT-RTX: ") and p.endswith(" s") for p in phases), told
        (top,) = [p for p in phases if p.startswith("TensorRT-RTX: Building engine done in ")]
        assert phases[-1] == top and 0 <= float(top.split()[-2]) <= m.components[name].build_s, told


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_all_five_components_build_as_real_plans(rtx, precision):
    from fluxtrt.backends.tensorrt.flavour import rtx_plan_version
    from fluxtrt.backends.tensorrt.plan import RTX_DEFAULT_TARGETS

    m = manifest(rtx / precision)
    assert (m.backend, m.backend_version, m.precision) == ("tensorrt-rtx", trt.__version__, precision)
    assert list(m.components) == list(COMPONENTS)
    for name, entry in m.components.items():
        plan = rtx / precision / entry.engine.path
        assert plan.name == f"{name}.plan" and plan.stat().st_size > 100_000
        assert rtx_plan_version(plan.read_bytes()[:64]) == trt.__version__  # a TensorRT-RTX plan of this release
        assert entry.record.tensorrt_rtx == trt.__version__
        # No GPU here: the default targets of the precision, as documented.
        assert entry.record.targets == RTX_DEFAULT_TARGETS[precision]
        assert entry.record.plan["tf32"] == (precision != "fp32") and entry.record.layers > 0
        assert entry.onnx and entry.settings["options"]["compute_capabilities"] is None


@pytest.mark.parametrize("precision", ["fp8", "fp4"])
def test_quantized_transformer_keeps_every_linear_quantized(rtx, tiny, precision):
    """The parsed network has one quantize layer and one FP8 (FP4) matrix multiply per calibrated linear."""
    from fluxtrt.engines.calibrate import quantized_linears

    entry = manifest(rtx / precision).components["transformer"]
    linears = len(quantized_linears(tiny.transformer))
    assert linears == 17  # the tiny model's token-wise linears
    assert entry.record.quantized_matmuls == {f"{precision}_quantize": linears, f"{precision}_matmuls": linears}
    assert entry.record.targets == {"fp8": (89, 120), "fp4": (120,)}[precision]


def test_first_block_cache_parts_build_as_fp8_plans_with_each_parts_linears_quantized(rtx, tiny, tmp_path):
    """The transformer's two parts (``--first-block-cache``) exported with FP8 Q/DQ from the build's calibration and
    built as real plans: each quantizes exactly the linears it computes, and together they are the transformer's."""
    from fluxtrt.backends.torch_modules import part_owns_linear
    from fluxtrt.engines.calibrate import quantized_linears
    from fluxtrt.specs.flux import TRANSFORMER_PARTS

    calibration = rtx / "onnx-fp8" / "calibration" / "transformer-fp8.safetensors"
    build(tmp_path / "onnx", backend="onnx", precision="fp8", first_block_cache=True, components=("transformer",),
          calibration=calibration)  # fmt: skip
    build(tmp_path / "fp8", precision="fp8", onnx_dir=tmp_path / "onnx" / "onnx", components=TRANSFORMER_PARTS)
    m = manifest(tmp_path / "fp8")
    assert list(m.components) == list(TRANSFORMER_PARTS)
    linears = quantized_linears(tiny.transformer)
    counts = {p: sum(part_owns_linear(p, n) for n in linears) for p in TRANSFORMER_PARTS}
    assert all(counts.values()) and sum(counts.values()) == len(linears) == 17
    for name, entry in m.components.items():
        assert (tmp_path / "fp8" / entry.engine.path).stat().st_size > 100_000
        assert entry.record.quantized_matmuls == {"fp8_quantize": counts[name], "fp8_matmuls": counts[name]}


def test_network_check_refuses_a_graph_that_lost_quantized_linears(rtx):
    """The FP8 graph parsed again, checked against one more quantized linear than it has: a BuildError."""
    from fluxtrt.backends.tensorrt.network import check_quantized, onnx_quantized_linears

    onnx_path = rtx / "onnx-fp8" / "onnx" / "transformer" / "model.onnx"
    assert onnx_quantized_linears(onnx_path) == {"fp8": 17}
    builder, network, _parser = TENSORRT_RTX.polygraphy().NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
    assert check_quantized(trt, network, "fp8", {"fp8": 17}, "transformer")["fp8_matmuls"] == 17
    with pytest.raises(BuildError, match="quantizes 18 linears to FP8 but TensorRT's network has 17 FP8 matrix"):
        check_quantized(trt, network, "fp8", {"fp8": 18}, "transformer")
    plain = rtx / "bf16" / "onnx" / "transformer" / "model.onnx"
    builder, network, _parser = TENSORRT_RTX.polygraphy().NetworkFromOnnxPath(str(plain), strongly_typed=True)()
    with pytest.raises(BuildError, match="quantizes 0 linears to FP8"):
        check_quantized(trt, network, "fp8", onnx_quantized_linears(plain), "transformer")


@pytest.mark.parametrize(
    ("precision", "targets", "needle"),
    [
        ("fp4", "8.9,12.0", "--precision fp4 for target 8.9 needs compute capability 10.0 or newer"),
        ("fp8", "8.6", "--precision fp8 for target 8.6 needs compute capability 8.9 or newer"),
        ("bf16", "9.0", "--compute-capability '9.0' is not a TensorRT-RTX target"),
    ],
)
def test_targets_that_cannot_run_the_precision_are_refused_before_anything(tmp_path, precision, targets, needle):
    out = tmp_path / "e"
    line = one_error_line(run_cli("build", "--model", "tiny", "--backend", "tensorrt-rtx", "--precision", precision,
                                  "--compute-capability", targets, "--out", str(out)))  # fmt: skip
    assert needle in line and "--compute-capability" in line
    assert not out.exists()


def test_onnx_only_directory_holds_the_onnx_and_the_trtexec_commands(rtx, tmp_path):
    root = rtx / "onnx-fp8"
    m = manifest(root)
    assert m.backend == "onnx" and m.calibration == "calibration/transformer-fp8.safetensors"
    assert not list(root.glob("*.plan")) and not list(root.glob("*.onnx"))
    for name, entry in m.components.items():
        assert entry.engine.path == f"onnx/{name}/model.onnx"
        assert entry.record.compute == ("fp8" if name == "transformer" else "bf16")
    # The commands match fluxtrt's profiles.
    shown = run_cli("inspect", str(root))
    assert shown.exit_code == 0, shown.stderr
    text = shown.stdout + shown.stderr
    profile = m.components["transformer"].profile["hidden_states"]
    command = next(line for line in text.splitlines() if line.startswith("trtexec --onnx=onnx/transformer/"))
    assert "--stronglyTyped" in command and "--timingCacheFile=timing.cache" in command
    for flag, shape in zip(("--minShapes", "--optShapes", "--maxShapes"), profile, strict=True):
        assert f"{flag}=hidden_states:{'x'.join(map(str, shape))}," in command
    # No engines to run: one line saying what to do.
    image = tmp_path / "in.png"
    make_image(256, 256).save(image)
    line = one_error_line(run_cli("infer", "--engines", str(root), "--image", str(image), "--prompt", "p",
                                  "--out", str(tmp_path / "o.png")))  # fmt: skip
    assert "holds ONNX only" in line and "--onnx-dir" in line and "trtexec" in line


def _load_job(root: Path, name: str = "clip", **record):
    from fluxtrt.backends.base import LoadJob
    from fluxtrt.backends.tensorrt import TensorRTRtxBackend
    from fluxtrt.specs.flux import component_specs

    m = manifest(root)
    entry = m.components[name]
    backend = TensorRTRtxBackend()
    spec = component_specs(m.dims)[name]
    job = LoadJob(spec, root / entry.engine.path, "cuda", torch.float32, entry.profile,
                  backend.options(entry.settings["options"]), replace(entry.record, **record))  # fmt: skip
    return backend, job


def test_plans_of_another_release_or_not_of_tensorrt_rtx_are_refused(rtx, tmp_path):
    from fluxtrt.backends.tensorrt import TensorRTRtxBackend

    backend, job = _load_job(rtx / "fp32", tensorrt_rtx="1.6.1.120")
    with pytest.raises(EngineError, match="built with TensorRT-RTX 1.6.1.120 but this is TensorRT-RTX 1.7.1.116"):
        backend._check_loadable(job)
    # The manifest agrees but the file was replaced by another release's plan: its header says so.
    plan = tmp_path / "clip.plan"
    data = bytearray((rtx / "fp32" / "clip.plan").read_bytes())
    data[24:28] = bytes([1, 6, 1, 120])
    plan.write_bytes(bytes(data))
    backend, job = _load_job(rtx / "fp32")
    job.engine_path = plan
    with pytest.raises(EngineError, match=r"is not a TensorRT-RTX 1.7.1.116 plan \(its header says 1.6.1.120\)"):
        backend._check_loadable(job)
    plan.write_bytes(b"garbage" * 100)
    with pytest.raises(EngineError, match="its header says no TensorRT-RTX plan"):
        backend._check_loadable(job)
    assert TensorRTRtxBackend().version() == trt.__version__


def test_unsupported_gpus_are_refused_naming_the_compute_capability():
    from fluxtrt.backends.tensorrt import check_runs_here

    with pytest.raises(DeviceError, match=r"compute capability 9.0, which TensorRT-RTX does not run \(it runs 8.0, "
                                          r"8.6, 8.9, 12.0, 12.1\): use --backend tensorrt"):  # fmt: skip
        check_runs_here(90, (89, 120), "clip.plan")
    with pytest.raises(DeviceError, match=r"compute capability 8.6 but the plan was built for 8.9, 12.0: rebuild "
                                          r"with --compute-capability 8.6"):  # fmt: skip
        check_runs_here(86, (89, 120), "clip.plan")
    check_runs_here(89, (89, 120), "clip.plan")


def test_running_without_a_gpu_is_one_line(rtx, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present here")
    image = tmp_path / "in.png"
    make_image(256, 256).save(image)
    line = one_error_line(run_cli("infer", "--engines", str(rtx / "fp32"), "--image", str(image), "--prompt", "p",
                                  "--out", str(tmp_path / "o.png")))  # fmt: skip
    assert "TensorRT-RTX engine, which runs on a CUDA GPU, but this run is on the CPU" in line
    assert not (tmp_path / "o.png").exists()
    backend, job = _load_job(rtx / "fp32")
    with pytest.raises(DeviceError):
        backend.load(job)


RTX_CANNOT_RUN = cannot_run_engines(TENSORRT_RTX)


@pytest.mark.gpu
@pytest.mark.skipif(RTX_CANNOT_RUN is not None, reason=f"the engine inspector deserializes a plan: {RTX_CANNOT_RUN}")
def test_engine_inspector_sees_fp8_layers(rtx):
    backend, job = _load_job(rtx / "fp8", "transformer")
    runner = backend.load(job)
    inspector = runner.engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    assert "FP8" in json.dumps(info)


def test_missing_package_message_reads_as_an_instruction(monkeypatch):
    import importlib

    from fluxtrt.backends.tensorrt.flavour import TENSORRT, TENSORRT_RTX
    from fluxtrt.errors import MissingDependencyError

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name.startswith("tensorrt")
                        else real(name, *a))  # fmt: skip
    with pytest.raises(MissingDependencyError) as info:
        TENSORRT_RTX.lib()
    assert str(info.value).endswith("which is not installed: run `pip install 'fluxtrt[tensorrt-rtx]'`")
    with pytest.raises(MissingDependencyError) as info:
        TENSORRT.lib()
    assert "not installed: install TensorRT 10 from NVIDIA's Python package index" in str(info.value)


def test_options_of_another_backend_are_refused(tmp_path):
    with pytest.raises(InputError, match="--workspace-gib is not an option of the tensorrt-rtx backend"):
        build(tmp_path / "e", options={"workspace_gib": 4.0})
    with pytest.raises(InputError, match="--compute-capability is not an option of the aotinductor backend"):
        build(tmp_path / "e", backend="aotinductor", options={"compute_capabilities": ("8.9",)})
    assert not (tmp_path / "e").exists()


def test_engines_dir_copy_keeps_working(rtx, tmp_path):
    """A copied directory is self-contained: its manifest checks pass and a rebuild finds everything up to date."""
    out = tmp_path / "copy"
    shutil.copytree(rtx / "fp32", out)
    report = build(out)
    assert [r.status for r in report.results] == ["up to date"] * 5


def test_onnx_only_build_report_shows_no_engine_size(tmp_path):
    out = tmp_path / "o"
    result = run_cli("build", "--model", "tiny", "--backend", "onnx", "--components", "clip", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "clip" in line and "built" in line)
    assert row.rstrip(" │|").endswith("-"), row  # the engine column: no engine was written
