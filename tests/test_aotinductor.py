"""AOTInductor backend on the tiny model, CPU: one build per component, loaded back in a fresh process.

Engines are built lazily, once per test session, into one temporary directory that the runner contract test shares
(conftest's ``aoti_engines``). The transformer is built with external weights, the others packaged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from fluxtrt.backends.aotinductor import REBUILD, AotInductorBackend
from fluxtrt.backends.aotinductor.options import AotInductorRecord
from fluxtrt.backends.aotinductor.runtime import external_weights_path
from fluxtrt.backends.base import LoadJob
from fluxtrt.backends.torch_modules import component_module
from fluxtrt.backends.torch_runner import torch_runners
from fluxtrt.errors import BuildError, EngineError, InputError
from fluxtrt.specs import Resolution, component_specs
from fluxtrt.specs.flux import component_dims, dims_from_components, profile_shapes
from tests.conftest import AOTI_BATCH as BATCH
from tests.conftest import AOTI_GEOMETRIES as GEOMETRIES
from tests.conftest import AOTI_RESOLUTIONS as RESOLUTIONS
from tests.conftest import TinyAotiEngines

# All five are built and run in one fresh interpreter (module fixture); these three cover text, image and the
# external-weights path, the other two are checked under the slow marker.
FAST = ("clip", "transformer", "vae_decoder")
SLOW = ("t5", "vae_encoder")


@pytest.fixture(scope="module")
def engines(aoti_engines):
    return aoti_engines


# Loads every engine named in args["entries"] with nothing but the files and the entry, runs the feeds, saves outputs.
CHILD = """
import json, sys
from pathlib import Path
import torch
from fluxtrt.backends.aotinductor import AotInductorBackend
from fluxtrt.backends.aotinductor.options import AotInductorRecord
from fluxtrt.backends.base import LoadJob
from fluxtrt.specs import component_specs
from fluxtrt.specs.flux import FluxDims

args = json.loads(sys.argv[1])
specs = component_specs(FluxDims(**args["dims"]))
feeds = torch.load(args["feeds"])
backend = AotInductorBackend()
outs = {}
for name, entry in args["entries"].items():
    job = LoadJob(specs[name], Path(args["root"]) / f"{name}.pt2", "cpu", torch.float32, entry["profile"],
                  backend.options(entry["options"]), AotInductorRecord.from_json(entry["record"]))
    runner = backend.load(job)
    outs[name] = [runner.infer(feed) for feed in feeds[name]]
torch.save(outs, args["out"])
"""


def run_in_fresh_process(root: Path, dims, entries: dict, feeds: dict, tmp_path: Path) -> dict:
    """Load ``root/<name>.pt2`` for each manifest entry in a new interpreter and run it on ``feeds[name]``."""
    torch.save(feeds, tmp_path / "feeds.pt")
    args = {
        "root": str(root),
        "dims": asdict(dims),
        "entries": {name: {**e, "record": e["record"].to_json()} for name, e in entries.items()},
        "feeds": str(tmp_path / "feeds.pt"),
        "out": str(tmp_path / "outs.pt"),
    }
    # A fresh interpreter with an empty inductor cache: the engine files alone must be enough.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "outs.pt")


@pytest.fixture(scope="module")
def fresh_process_outputs(engines, tmp_path_factory) -> tuple[dict, dict]:
    """All five engines built, then loaded and run at both geometries in one new interpreter: (feeds, outputs)."""
    names = (*FAST, *SLOW)
    entries = {name: engines.entry(name) for name in names}
    feeds = {
        name: [
            engines.specs[name].sample_feed(component_dims(name, engines.dims, *geometry), torch.float32, seed=i)
            for i, geometry in enumerate(GEOMETRIES)
        ]
        for name in names
    }
    outs = run_in_fresh_process(engines.root, engines.dims, entries, feeds, tmp_path_factory.mktemp("fresh"))
    return feeds, outs


def _check_fresh_process_parity(engines: TinyAotiEngines, tiny, names: tuple[str, ...], fresh: tuple) -> None:
    """``names`` as the fresh interpreter ran them at both geometries, compared with the torch runners."""
    feeds, outs = fresh
    reference = torch_runners(tiny)
    for name in names:
        spec = engines.specs[name]
        tol = spec.tolerance["fp32"]
        for feed, out in zip(feeds[name], outs[name], strict=True):
            want = reference[name].infer(feed)
            assert list(out) == list(spec.output_names)
            for key in spec.output_names:
                got, ref = out[key], want[key]
                assert got.shape == ref.shape and got.dtype == ref.dtype, (name, key, got.shape, ref.shape)
                err = (got - ref).abs()
                bound = tol.atol + tol.rtol * ref.abs()
                assert (err <= bound).all(), f"{name}.{key} {tuple(ref.shape)}: max error {err.max():.3g}, {tol}"


def test_engines_match_torch_in_a_fresh_process(engines, tiny, fresh_process_outputs):
    """clip, transformer (external weights) and vae_decoder: one build each, two geometries, fp32 tolerance."""
    _check_fresh_process_parity(engines, tiny, FAST, fresh_process_outputs)


@pytest.mark.slow
def test_text_and_image_encoders_match_torch_in_a_fresh_process(engines, tiny, fresh_process_outputs):
    _check_fresh_process_parity(engines, tiny, SLOW, fresh_process_outputs)


def test_build_records_the_environment_and_ranges(engines):
    options = engines.entry("clip")["record"]
    assert (options.torch, options.device, options.gpu, options.sm) == (torch.__version__, "cpu", None, None)
    assert options.dims == {"B": [1, 2]}
    decoder = engines.entry("vae_decoder")["record"]
    assert decoder.dims == {"B": [1, 2], "h": [4, 16], "w": [4, 16]}
    assert not external_weights_path(engines.path("clip")).exists()
    # The manifest stores them as JSON, and reads them back the same.
    assert AotInductorRecord.from_json(json.loads(json.dumps(decoder.to_json()))) == decoder
    # The transformer is exported with fused Q/K/V; the model it was built from is left unfused.
    transformer = engines.components.transformer
    attentions = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert engines.entry("transformer")["record"].fused_qkv == attentions
    assert not any(getattr(m, "fused_projections", False) for m in transformer.modules())
    # ... and with every tanh GELU in its sigmoid form (one per single block, two per double block); the model keeps
    # its own.
    gelus = 2 * len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert engines.entry("transformer")["record"].sigmoid_form_gelus == gelus
    assert all(type(b.act_mlp) is torch.nn.GELU for b in transformer.single_transformer_blocks)
    assert options.fused_qkv is None and "fused_qkv" not in options.to_json()


def test_external_weights_live_beside_the_engine_and_are_the_ones_used(engines, tmp_path):
    """The transformer's weights come from <stem>.safetensors: shifting proj_out's bias there shifts noise_pred."""
    from safetensors.torch import load_file, save_file

    runner = engines["transformer"]
    weights_file = external_weights_path(engines.path("transformer"))
    assert weights_file.name == "transformer.safetensors"
    weights = load_file(str(weights_file))
    assert set(weights) == set(runner.model.get_constant_fqns())

    # A copy of the engine with proj_out.bias + 0.5: proj_out is the transformer's last op.
    shutil.copy(engines.path("transformer"), tmp_path / "transformer.pt2")
    save_file({**weights, "transformer.proj_out.bias": weights["transformer.proj_out.bias"] + 0.5},
              str(tmp_path / "transformer.safetensors"))  # fmt: skip
    job = engines.load_job("transformer")
    job.engine_path = tmp_path / "transformer.pt2"
    shifted = engines.backend.load(job)
    spec = engines.specs["transformer"]
    feed = spec.sample_feed(component_dims("transformer", engines.dims, *GEOMETRIES[0]), torch.float32)
    delta = shifted.infer(feed)["noise_pred"] - runner.infer(feed)["noise_pred"]
    torch.testing.assert_close(delta, torch.full_like(delta, 0.5), atol=1e-5, rtol=0)
    with torch.inference_mode():  # as the pipeline calls runners
        torch.testing.assert_close(runner.infer(feed)["noise_pred"], shifted.infer(feed)["noise_pred"] - 0.5)

    (tmp_path / "transformer.safetensors").unlink()
    with pytest.raises(EngineError, match="transformer.safetensors, which is missing"):
        engines.backend.load(job)


def test_a_package_model_given_the_external_weights_computes_what_the_runner_does(engines):
    """How a CUDA runner loads the transformer (``PackageModel``, no ISA probe, its external weights handed over as
    user-managed constants): what the CPU runner (torch's own wrapper) computes, bit for bit; a constant pointed at
    another tensor (as a LoRA change does) is what the next call uses."""
    from safetensors.torch import load_file

    from fluxtrt.backends.aotinductor.runtime import PackageModel, load_package

    runner = engines["transformer"]
    model = load_package(engines.path("transformer"), probe_host_isa=False)
    assert isinstance(model, PackageModel)
    weights = load_file(str(external_weights_path(engines.path("transformer"))))
    model.load_constants(weights, check_full_update=True, user_managed=True)
    spec = engines.specs["transformer"]
    feed = spec.sample_feed(component_dims("transformer", engines.dims, *GEOMETRIES[0]), torch.float32, seed=5)
    args = [feed[n].contiguous() for n in spec.input_names]
    with torch.inference_mode():
        want = runner.infer(feed)["noise_pred"]
        assert torch.equal(model(*args), want)
        bias = "transformer.proj_out.bias"
        model.loader.load_constants({bias: weights[bias] + 0.5}, False, False, True)
        torch.testing.assert_close(model(*args) - want, torch.full_like(want, 0.5), atol=1e-5, rtol=0)


# A torch version no machine runs, whatever this one has.
ANOTHER_TORCH = f"0.0.0+not-{torch.__version__}"


def test_engine_of_another_torch_is_refused(engines):
    record = replace(engines.entry("clip")["record"], torch=ANOTHER_TORCH)
    with pytest.raises(EngineError) as info:
        engines.backend.load(engines.load_job("clip", record=record))
    message = str(info.value)
    assert f"built with torch {ANOTHER_TORCH} but this is torch {torch.__version__}" in message
    assert message.endswith(REBUILD) and "\n" not in message

    with pytest.raises(EngineError, match="built with device cuda but this is device cpu"):
        engines.backend.load(engines.load_job("clip", record=replace(record, torch=torch.__version__, device="cuda")))
    with pytest.raises(EngineError, match="records no torch version"):
        engines.backend.load(engines.load_job("clip", record=AotInductorRecord()))


def test_precision_and_option_refusals(engines, tmp_path):
    def job(precision="fp32", **options):
        return engines.build_job("clip", precision, tmp_path / "clip.pt2", module=torch.nn.Identity(), **options)

    with pytest.raises(InputError, match="--precision is 'fp4' but the aotinductor backend builds fp32, bf16, fp8"):
        engines.backend.build(job("fp4"))
    with pytest.raises(InputError, match="--aoti-weights is 'inline', expected one of packaged, external"):
        job(weights="inline")
    with pytest.raises(InputError, match="--workspace-gib is not an option of the aotinductor backend"):
        job(workspace_gib=4.0)
    with pytest.raises(InputError, match="--cuda-graph is set but the engines are built for device 'cpu'"):
        engines.backend.build(job(cuda_graph=True))
    transformer = engines.build_job("transformer", "fp8", tmp_path / "transformer.pt2", module=torch.nn.Identity())
    with pytest.raises(InputError, match="transformer: --precision fp8 needs calibrated input scales"):
        engines.backend.build(transformer)
    assert not (tmp_path / "clip.pt2").exists() and not (tmp_path / "transformer.pt2").exists()


def test_engine_needing_an_fp8_attention_kernel_that_is_missing_is_refused(engines):
    """A package that calls cuDNN's FP8 attention, loaded where nvidia-cudnn-frontend is not installed."""
    from fluxtrt.errors import MissingDependencyError

    try:
        import cudnn  # noqa: F401

        pytest.skip("nvidia-cudnn-frontend is installed here")
    except ImportError:
        pass
    entry = engines.entry("transformer")
    job = engines.load_job("transformer", record=replace(entry["record"], attention=["fluxtrt::cudnn_fp8_sdpa"]))
    with pytest.raises(MissingDependencyError, match="transformer.pt2 .*nvidia-cudnn-frontend.*pip install"):
        engines.backend.load(job)


def test_failed_compile_is_a_build_error_and_leaves_no_file(engines, tiny, tmp_path):
    job = engines.build_job("clip", "fp32", tmp_path / "clip.pt2", inductor_configs={"no_such_setting": 1})
    with pytest.raises(BuildError, match="clip: AOTInductor failed to compile the exported graph .*no_such_setting"):
        engines.backend.build(job)
    assert not any(tmp_path.iterdir())


def test_profile_beyond_what_the_model_allows_is_a_build_error(engines, tiny, tmp_path):
    """The diffusers VAE decoder takes another code path from batch 64 on: a batch range past it cannot export."""
    spec = engines.specs["vae_decoder"]
    profile = profile_shapes(spec, engines.dims, (1, 1, 80), RESOLUTIONS)
    job = engines.build_job("vae_decoder", "fp32", tmp_path / "vae_decoder.pt2")
    job.profile = profile
    with pytest.raises(BuildError, match=r"vae_decoder: torch.export cannot keep .*'B': \[1, 80\].*max=63") as info:
        engines.backend.build(job)
    assert "\n" not in str(info.value)


def test_missing_compiler_is_reported():
    from torch._inductor import config, cpp_builder

    cpp_builder.cpp_compiler_search.cache_clear()
    try:
        with (
            config.patch({"cpp.cxx": ("fluxtrt-no-such-c++",)}),
            pytest.raises(BuildError, match="needs a C.. compiler"),
        ):
            AotInductorBackend().check_available()  # loading needs no compiler
            AotInductorBackend().check_buildable()
    finally:
        cpp_builder.cpp_compiler_search.cache_clear()
    AotInductorBackend().check_available()
    assert AotInductorBackend().version() == torch.__version__


def test_fp8_transformer_engine_follows_the_static_scales(tmp_path):
    """``fluxtrt build --backend aotinductor --precision fp8``: FP8 weights in the package (Q/K/V fused), outputs as
    the fake-quant oracle of the unfused model computes them.

    The calibration's amax is shrunk 20x, so the activations clip and FP8 moves the output by about 6% (0.35% with
    the real scales, below the bf16 noise of the tiny model): an engine that ignored the scales could not track the
    oracle. Measured: engine vs oracle 0.4%.
    """
    import copy

    from safetensors.torch import load_file

    from fluxtrt.backends.torch_modules import TransformerModule
    from fluxtrt.config import BuildConfig
    from fluxtrt.engines.build import build_engines
    from fluxtrt.engines.calibrate import calibrate, quantized_linears
    from fluxtrt.engines.manifest import Manifest
    from fluxtrt.models import load_components
    from fluxtrt.models.loading import model_fingerprint
    from fluxtrt.quant.fakequant import fake_quantize, fp8_weight

    fp32 = load_components("tiny", "cpu", "fp32")
    calibration = calibrate(fp32, fingerprint=model_fingerprint("tiny"), precision="fp8", edits=1, steps=2,
                            width=128, height=128)  # fmt: skip
    calibration.amax = {k: v / 20 for k, v in calibration.amax.items()}
    scales = calibration.save(tmp_path / "clipping-fp8.safetensors")
    config = BuildConfig(model="tiny", backend="aotinductor", precision="fp8", out=tmp_path / "engines",
                         min_resolution=Resolution(64, 64), opt_resolution=Resolution(128, 128),
                         max_resolution=Resolution(160, 160), components=("transformer",), calibration=scales,
                         options={"weights": "external"})  # fmt: skip
    said: list[tuple[str, str]] = []
    report = build_engines(config, lambda component, message: said.append((component, message)))
    entry = report.manifest.components["transformer"]
    names = quantized_linears(fp32.transformer)
    # Counted: each attention's three Q/K/V projections (and three added ones in double blocks) become one fused
    # linear, every other quantized linear stays itself.
    doubles, singles = len(fp32.transformer.transformer_blocks), len(fp32.transformer.single_transformer_blocks)
    fused = {n.rsplit(".", 1)[0] + (".to_qkv" if n.endswith(".to_q") else ".to_added_qkv")
             for n in names if n.endswith((".to_q", ".add_q_proj"))}  # fmt: skip
    kept = {n for n in names if not n.endswith((".to_q", ".to_k", ".to_v", "_q_proj", "_k_proj", "_v_proj"))}
    assert len(fused) == 2 * doubles + singles and len(names) == len(kept) + 3 * len(fused)
    assert entry.record.fused_qkv == doubles + singles and entry.record.attention
    assert entry.record.fp8_linears == len(kept) + len(fused)
    assert entry.record.fp8_attention is False  # a CPU build keeps SDPA by default
    # Where the build's time went, kept in the manifest: export, compile, weights, within the component's build time.
    saved = Manifest.load(tmp_path / "engines").components["transformer"]
    phases = (saved.record.export_s, saved.record.compile_s, saved.record.weights_s)
    assert saved.record.compile_s > 0 and 0 < sum(phases) <= saved.build_s + 0.2, (phases, saved.build_s)
    # Inductor's own phases of that compile, those of a second or more (several on a 2-core CPU; a compile of a few
    # seconds has at least its outermost), none longer than all of it.
    # Each step of the build was told as it ended, with the seconds the record keeps.
    told = [m for c, m in said if c == "transformer"]
    record = saved.record
    assert told[told.index("building aotinductor engine") + 1 :] == [
        f"exported in {record.export_s:.1f} s; compiling with inductor",
        f"compiled in {record.compile_s:.1f} s; writing its weights",
    ], told
    inside = saved.record.compile_phases_s or {}
    assert inside or saved.record.compile_s < 3, saved.record
    assert max(inside.values(), default=0) <= saved.record.compile_s + 0.2, (inside, saved.record.compile_s)
    # `fluxtrt inspect` shows what the engine runs.
    from tests.conftest import run_cli

    shown = run_cli("inspect", str(tmp_path / "engines")).stdout.splitlines()
    assert any("fp8_linears" in line and f" {len(kept) + len(fused)} " in line for line in shown), shown
    assert any("fp8_attention" in line and " False " in line for line in shown), shown

    # One FP8 weight per quantized linear, bit for bit the scheme's, and no other FP8 tensor.
    weights = load_file(str(tmp_path / "engines" / "transformer.safetensors"))
    fp8 = {k.removeprefix("transformer.").removesuffix(".weight") for k, v in weights.items()
           if v.dtype == torch.float8_e4m3fn}  # fmt: skip
    assert fp8 == kept | fused
    # The GEMMs' per-row scale is one shared constant of ones, as long as the joined text and image tokens at the
    # largest resolution (in place of a copy of each linear's input scale written before every GEMM).
    units = [k for k in weights if k.endswith(".unit_rows")]
    assert len(units) == 1, units
    joined = entry.profile["hidden_states"][2][1] + entry.profile["encoder_hidden_states"][2][1]
    assert weights[units[0]].shape[0] >= joined and torch.equal(weights[units[0]], torch.ones_like(weights[units[0]]))
    bf16 = load_components("tiny", "cpu", "bf16")
    block = bf16.transformer.transformer_blocks[0]
    for name, weight in (
        ("transformer_blocks.0.ff.net.2", block.ff.net[2].weight),
        (
            "transformer_blocks.0.attn.to_qkv",
            torch.cat([block.attn.to_q.weight, block.attn.to_k.weight, block.attn.to_v.weight]),
        ),
    ):
        want, _ = fp8_weight(weight)
        assert torch.equal(weights[f"transformer.{name}.weight"].view(torch.uint8), want.view(torch.uint8)), name

    dims = dims_from_components(fp32)
    spec = component_specs(dims)["transformer"]
    backend = AotInductorBackend()
    job = LoadJob(spec, tmp_path / "engines" / entry.engine.path, "cpu", torch.bfloat16, entry.profile,
                  backend.options(entry.settings["options"]), entry.record)  # fmt: skip
    runner = backend.load(job)
    feed = spec.sample_feed(component_dims("transformer", dims, 1, Resolution(128, 96), Resolution(96, 128)),
                            torch.bfloat16, seed=3)  # fmt: skip
    got = runner.infer(feed)["noise_pred"].float()
    feed32 = {k: v.float() if v.is_floating_point() else v for k, v in feed.items()}
    with torch.no_grad():
        oracle = TransformerModule(fake_quantize(copy.deepcopy(fp32.transformer), calibration.amax, "fp8"))(**feed32)
        plain = TransformerModule(fp32.transformer)(**feed32)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(oracle, plain) > 0.04  # the clipping scales matter
    assert rel(got, oracle) < 0.015, (rel(got, oracle), rel(oracle, plain))


def test_fp8_attention_engine_runs_fluxtrts_op_in_a_fresh_process(tiny, tmp_path, monkeypatch):
    """``--aoti-fp8-attention``: the package calls fluxtrt's FP8 attention op, and a fresh process that loads it
    through the backend computes what the eager model with the FP8 attention processor computes.

    The real kernels (FA3, cuDNN FP8 SDPA) need a Hopper GPU. The emulated kernel is the same kind of op (a
    registered custom op on e4m3 Q/K/V), so this covers the export around it, the package's call back into the
    registered op, and loading in a process that never imported it itself.
    """
    import fluxtrt.kernels.attention as attention
    from fluxtrt.backends.base import BuildJob
    from fluxtrt.backends.torch_modules import TransformerModule
    from fluxtrt.kernels.attention import fp8_attention
    from fluxtrt.kernels.attention_ops import EmulatedFp8Kernel

    # The kernel choice (then its check run, as for a real kernel) gives the emulated one.
    monkeypatch.setattr(attention, "fp8_attention_kernel", lambda device: EmulatedFp8Kernel())
    dims = dims_from_components(tiny)
    spec = component_specs(dims)["transformer"]
    processors = {k: type(v) for k, v in tiny.transformer.attn_processors.items()}
    backend = AotInductorBackend()
    options = {"fp8_attention": True, "weights": "external"}  # the static Q/K descales are constants too
    job = BuildJob(spec, component_module("transformer", tiny), None, tmp_path / "transformer.pt2", "fp32",
                   profile_shapes(spec, dims, BATCH, RESOLUTIONS), "cpu", tmp_path / "work",
                   backend.options(options))  # fmt: skip
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = backend.build(job)
    # torch's internal LeafSpec deprecation (once per component, raised inside export and inductor) is not shown.
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    assert record.fp8_attention is True
    assert record.fp8_attention_scales == "Q, K: static norm bound (fluxtrt::norm_rope_fp8); V: dynamic amax"
    assert record.attention == ["fluxtrt::emulated_fp8_sdpa"]  # the only attention in the package
    # The build leaves the model as it found it.
    assert {k: type(v) for k, v in tiny.transformer.attn_processors.items()} == processors

    feeds = {"transformer": [spec.sample_feed(component_dims("transformer", dims, *geometry), torch.float32, seed=i)
                             for i, geometry in enumerate(GEOMETRIES)]}  # fmt: skip
    entry = {"profile": {k: [list(s) for s in v] for k, v in job.profile.items()}, "options": options, "record": record}
    outs = run_in_fresh_process(tmp_path, dims, {"transformer": entry}, feeds, tmp_path)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    module = component_module("transformer", tiny)
    for feed, out in zip(feeds["transformer"], outs["transformer"], strict=True):
        with torch.inference_mode():
            plain = module(**feed)
            with fp8_attention(tiny.transformer, EmulatedFp8Kernel(), static_qk=True):
                oracle = TransformerModule(tiny.transformer)(**feed)
        got = out["noise_pred"]
        # FP8 Q/K/V move the tiny model's output by about 4e-4; the engine sits 50x closer to the FP8 oracle (Q and
        # K quantized with their static bound, as the engine does).
        assert rel(oracle, plain) > 1e-4
        assert rel(got, oracle) < 0.02 * rel(oracle, plain), (rel(got, oracle), rel(oracle, plain))


def test_fp8_attention_asked_for_where_no_kernel_runs_is_refused(tiny, tmp_path):
    """Explicit ``--aoti-fp8-attention`` on a CPU build: one line naming the device and the fix, no file."""
    from fluxtrt.errors import DeviceError

    engines = TinyAotiEngines(tiny)
    job = engines.build_job("transformer", "fp32", tmp_path / "transformer.pt2", fp8_attention=True)
    with pytest.raises(DeviceError, match="FP8 attention is unavailable on cpu.*--device cuda"):
        engines.backend.build(job)
    assert not (tmp_path / "transformer.pt2").exists()


def test_loading_without_the_host_isa_probe_gives_the_same_engine(engines, monkeypatch):
    """``probe_host_isa=False`` (how CUDA packages load): torch's loader without its host-CPU probe, which compiles a
    program per vector ISA the first time a process asks. With the probe made to fail, the package still loads,
    and it computes exactly what the probed load computes."""
    import torch._inductor.cpu_vec_isa as isa

    from fluxtrt.backends.aotinductor.runtime import load_package

    engines.entry("clip")  # built once per session
    path = engines.path("clip")
    spec = engines.specs["clip"]
    feed = spec.sample_feed(component_dims("clip", engines.dims, *GEOMETRIES[0]), torch.float32, seed=3)
    args = [feed[n] for n in spec.input_names]
    with torch.inference_mode():
        want = load_package(path)(*args)

        def no_probe():
            raise AssertionError("the host ISA was probed")

        monkeypatch.setattr(isa, "pick_vec_isa", no_probe)
        got = load_package(path, probe_host_isa=False)(*args)
        with pytest.raises(AssertionError, match="probed"):
            load_package(path)

    def outputs(out):
        return list(out) if isinstance(out, (list, tuple)) else [out]

    for a, b in zip(outputs(want), outputs(got), strict=True):
        assert torch.equal(a, b)
    # That load, in a fresh process, imports neither inductor nor dynamo (a second of every CUDA load's start).
    code = ("import sys; from fluxtrt.backends.aotinductor.runtime import load_package; "
            f"load_package({str(path)!r}, probe_host_isa=False); "
            "print([m for m in ('torch._inductor', 'torch._dynamo') if m in sys.modules])")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_the_inductor_cache_is_an_absolute_path_for_a_relative_out(tmp_path, monkeypatch):
    """inductor compiles a CUDA package's C++ in other working directories: with the cache under a relative
    ``--out`` every CUDA build failed (CppCompileError), so the cache's path is made absolute; put back after."""
    from fluxtrt.backends.aotinductor.build import _inductor_cache

    monkeypatch.chdir(tmp_path)
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with _inductor_cache(Path("engines") / ".staging" / "inductor-cache"):
        got = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        assert got.is_absolute() and got == tmp_path / "engines" / ".staging" / "inductor-cache" and got.is_dir()
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before


def test_an_fp8_build_gives_each_attention_its_calibrated_v_amax(tiny, monkeypatch):
    """The module as an fp8 build with FP8 attention exports it: every processor quantizes V with the amax its
    attention has in the calibration (the build's scales carry them beside the linears'), and the record says so."""
    import fluxtrt.kernels.attention as attention
    from fluxtrt.backends.aotinductor.build import _prepared_for_export
    from fluxtrt.backends.base import BuildJob
    from fluxtrt.engines.calibrate import calibrate
    from fluxtrt.kernels.attention_ops import EmulatedFp8Kernel
    from fluxtrt.models.loading import model_fingerprint

    monkeypatch.setattr(attention, "fp8_attention_kernel", lambda device: EmulatedFp8Kernel())
    calibration = calibrate(tiny, fingerprint=model_fingerprint("tiny"), precision="fp8", edits=1, steps=2,
                            width=128, height=128)  # fmt: skip
    dims = dims_from_components(tiny)
    spec = component_specs(dims)["transformer"]
    backend = AotInductorBackend()
    scales = {f"transformer.{k}": v for k, v in calibration.scales().items()}  # as build_component hands them
    before = tiny.transformer.attn_processors
    job = BuildJob(spec, component_module("transformer", tiny), None, Path("unused.pt2"), "fp8",
                   profile_shapes(spec, dims, BATCH, RESOLUTIONS), "cpu", Path("unused"),
                   backend.options({"fp8_attention": True}), scales)  # fmt: skip
    record = AotInductorRecord()
    with _prepared_for_export(job, record):
        processors = tiny.transformer.attn_processors
        got = {name.removesuffix(".processor"): p.amax.v for name, p in processors.items()}
    assert got == calibration.attention_v and len(got) == 2
    assert record.fp8_attention_scales == "Q, K: static norm bound (fluxtrt::norm_rope_fp8); V: calibrated amax"
    # The linears' scales went to the linears: three fused Q/K/V groups (two in the double block), 3 -> 1 each.
    assert record.fp8_linears == len(calibration.amax) - 3 * 2
    assert {type(p) for p in tiny.transformer.attn_processors.values()} == set(map(type, before.values()))
