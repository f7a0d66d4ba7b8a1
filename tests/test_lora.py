"""LoRA on the tiny model: LoRAs made in the test with peft (rank 4, attention and MLP linears of both block kinds),
fused into PyTorch against peft's own merge, merged into ONNX Runtime engines against PyTorch with them fused, and
the bad files refused in one line with nothing changed."""

from __future__ import annotations

import copy

import pytest
import torch

from fluxtrt.errors import InputError
from tests.conftest import make_image

peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
           "ff_context.net.2", "proj_mlp", "proj_out"]  # fmt: skip
SIZE = 256


def make_lora(transformer, path, seed: int):
    """A rank-4 peft LoRA on a copy of ``transformer`` (random A and B), saved in diffusers' format; returns the
    peft-wrapped copy (peft's own merge is the oracle)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False),
                                    copy.deepcopy(transformer))  # fmt: skip
    state = get_peft_model_state_dict(model)
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(path))
    return model


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    made = {}
    for name, seed in (("a", 1), ("b", 2)):
        made[name] = (root / f"{name}.safetensors", make_lora(tiny.transformer, root / f"{name}.safetensors", seed))
    return made


def read(path, scale=1.0):
    from fluxtrt.lora.files import LoraSpec, read_lora

    return read_lora(LoraSpec.parse(f"{path}:{scale}"))


def test_lora_targets_both_block_kinds(loras):
    modules = read(loras["a"][0]).layers
    assert any(m.startswith("transformer_blocks.") for m in modules)
    assert any(m.startswith("single_transformer_blocks.") for m in modules)
    assert all(layer.down.shape[0] == 4 for layer in modules.values())


def test_pytorch_fuse_equals_peft_merge_and_unfuse_restores(tiny, loras):
    from peft.tuners.lora import LoraLayer

    from fluxtrt.lora.fuse import fuse, unfuse

    path, oracle = loras["a"]
    transformer = copy.deepcopy(tiny.transformer)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    originals = fuse(transformer, [read(path, 0.7)])
    oracle = copy.deepcopy(oracle)
    for module in oracle.modules():
        if isinstance(module, LoraLayer):
            module.scaling["default"] *= 0.7
            module.merge()
    merged = {n: m.base_layer.weight for n, m in oracle.named_modules() if isinstance(m, LoraLayer)}
    assert len(merged) == len(originals) > 0
    for name, weight in merged.items():
        assert torch.allclose(transformer.get_submodule(name).weight, weight, rtol=0, atol=1e-6), name
    unfuse(transformer, originals)
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())


def edit(pipeline):
    # The reference at its own size (not its preferred ~1 MP): the LoRA acts on the transformer alone.
    return pipeline.edit(make_image(SIZE, SIZE), "make it red", seed=3, height=SIZE, width=SIZE,
                         max_area=SIZE * SIZE, auto_resize=False).latents  # fmt: skip


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def torch_latents(tiny, loras):
    """PyTorch's latents without LoRA, with A, and with A + B (0.5) fused: the engines' oracle."""
    from fluxtrt.lora.fuse import fuse, unfuse
    from fluxtrt.pipeline.kontext import KontextPipeline

    pipeline = KontextPipeline.from_components(tiny)
    out = {"none": edit(pipeline)}
    for key, specs in (("a", [(loras["a"][0], 1.0)]), ("ab", [(loras["a"][0], 1.0), (loras["b"][0], 0.5)])):
        originals = fuse(tiny.transformer, [read(p, s) for p, s in specs])
        try:
            out[key] = edit(pipeline)
        finally:
            unfuse(tiny.transformer, originals)
    return out


def test_ort_engine_lora_equals_pytorch_fused(ort_engines, loras, torch_latents):
    from fluxtrt.engines.load import load_engine_pipeline
    from fluxtrt.lora.engines import apply_to_runner

    a, b = read(loras["a"][0]), read(loras["b"][0], 0.5)
    with load_engine_pipeline(ort_engines, "cpu") as pipeline:
        runner = pipeline.runners["transformer"]
        base = edit(pipeline)
        tolerance = max(10 * rel(base, torch_latents["none"]), 1e-4)  # what the engine has without a LoRA
        apply_to_runner(runner, [a])
        with_a = edit(pipeline)
        assert rel(with_a, torch_latents["a"]) <= tolerance
        assert rel(with_a, base) > 100 * tolerance  # the LoRA changes the edit measurably
        apply_to_runner(runner, [a, b])
        assert rel(edit(pipeline), torch_latents["ab"]) <= tolerance  # two at once: their fused sum
        apply_to_runner(runner, [b])
        apply_to_runner(runner, [a])
        assert torch.equal(edit(pipeline), with_a)  # A -> B -> A returns A exactly
        apply_to_runner(runner, [read(loras["a"][0], 0.0)])
        assert torch.equal(edit(pipeline), base)  # scale 0
        apply_to_runner(runner, [a])
        apply_to_runner(runner, [])
        assert torch.equal(edit(pipeline), base)  # removal


def as_fp32(feed: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in feed.items()}


@pytest.fixture(scope="module")
def fp8_engine(tiny, aoti_engines, tmp_path_factory):
    """The tiny transformer as an FP8 AOTInductor engine (external weights, fused Q/K/V), its linears' input amax
    recorded on the test's own input (fluxtrt's calibration hooks), and that input."""
    from dataclasses import replace

    from fluxtrt.backends.base import LoadJob
    from fluxtrt.backends.torch_modules import TransformerModule
    from fluxtrt.engines.calibrate import recorded_input_amax
    from fluxtrt.specs import Resolution
    from fluxtrt.specs.flux import component_dims, profile_shapes

    engines = aoti_engines
    feed = engines.specs["transformer"].sample_feed(
        component_dims("transformer", engines.dims, 1, Resolution(64, 64), Resolution(64, 64)), torch.bfloat16, seed=3
    )
    with torch.no_grad(), recorded_input_amax(tiny.transformer) as amax:
        TransformerModule(tiny.transformer)(**as_fp32(feed))
    amax = dict(amax)
    path = tmp_path_factory.mktemp("fp8") / "transformer.pt2"
    module = TransformerModule(copy.deepcopy(tiny.transformer).to(torch.bfloat16))
    # One size (a static package compiles faster than a dynamic one).
    profile = profile_shapes(engines.specs["transformer"], engines.dims, (1, 1, 1), (Resolution(64, 64),) * 3)
    job = replace(engines.build_job("transformer", "fp8", path, module=module, weights="external"), profile=profile,
                  amax={f"transformer.{k}": v for k, v in amax.items()})  # fmt: skip
    with torch.inference_mode():
        record = engines.backend.build(job)
    runner = engines.backend.load(LoadJob(job.spec, path, "cpu", torch.bfloat16, job.profile, job.options, record))
    return runner, amax, feed


def test_aoti_fp8_lora_requantized_equals_pytorch_fused_then_quantized(tiny, fp8_engine, loras):
    """An FP8 AOTInductor transformer with LoRAs against the PyTorch model with them fused and then FP8
    fake-quantized with the same input scales: within the error the engine has without a LoRA."""
    from fluxtrt.backends.torch_modules import TransformerModule
    from fluxtrt.lora.engines import apply_to_runner
    from fluxtrt.lora.fuse import fuse
    from fluxtrt.quant.fakequant import fake_quantize

    runner, amax, feed = fp8_engine
    a, b = read(loras["a"][0]), read(loras["b"][0], 0.5)

    def oracle(chosen):
        model = copy.deepcopy(tiny.transformer)
        if chosen:
            fuse(model, chosen)
        with torch.no_grad():
            return TransformerModule(fake_quantize(model, amax, "fp8"))(**as_fp32(feed))

    def engine():
        return runner.infer(feed)["noise_pred"].float()

    base = engine()
    tolerance = 3 * rel(base, oracle([]))  # measured: 1.5x with A, 1.6x with A + B
    runner.model.loader = handed = HandedStorages(runner.model.loader)
    try:
        apply_to_runner(runner, [a])
        with_a = engine()
        assert rel(with_a, oracle([a])) <= tolerance
        assert rel(with_a, base) > 10 * tolerance  # the LoRA changes the output measurably
        apply_to_runner(runner, [a, b])
        assert rel(engine(), oracle([a, b])) <= tolerance  # two at once: their fused sum
        apply_to_runner(runner, [b])
        apply_to_runner(runner, [a])
        assert torch.equal(engine(), with_a)  # A -> B -> A returns A exactly
        apply_to_runner(runner, [read(loras["a"][0], 0.0)])
        assert torch.equal(engine(), base)  # scale 0
        apply_to_runner(runner, [a])
    finally:
        apply_to_runner(runner, [])
        runner.model.loader = handed.loader
    assert torch.equal(engine(), base)  # removal: the original constants, bit for bit
    # The package never releases a storage it was handed: after six changes it holds one merged copy of each
    # replaced constant beside the originals, not one per change.
    originals = {t.untyped_storage().data_ptr() for t in runner._constants.values()}
    replaced = sum(1 + p.fp8 for p in runner._packed.values() if any(m in a.layers or m in b.layers for m in p.modules))
    assert len(handed.storages - originals) == replaced > 0  # a weight, and an FP8 weight's output_scale


class HandedStorages:
    """A package loader that records the storage of every constant handed to ``load_constants``."""

    def __init__(self, loader):
        self.loader, self.storages = loader, set()

    def load_constants(self, constants, *args):
        self.storages |= {t.untyped_storage().data_ptr() for t in constants.values()}
        return self.loader.load_constants(constants, *args)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def test_fp8_weight_whose_scales_are_no_constants_is_refused_in_one_line():
    """A package that compiled an FP8 linear's scales into its code (no constant to replace) cannot take a LoRA."""
    from fluxtrt.backends.aotinductor import REBUILD
    from fluxtrt.backends.aotinductor.weights import packed_linears
    from fluxtrt.errors import EngineError

    constants = {"transformer.proj_out.weight": torch.zeros(4, 8, dtype=torch.float8_e4m3fn),
                 "transformer.proj_out.input_inverse_scale": torch.ones(1, 1)}  # fmt: skip
    with pytest.raises(EngineError, match=r"no constant transformer\.proj_out\.output_scale .* --precision bf16") as e:
        packed_linears(constants, "transformer: transformer.pt2", REBUILD)
    assert "\n" not in str(e.value)


def write_lora(path, tensors: dict) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def test_bad_loras_one_line_each_and_nothing_changed(ort_engines, tmp_path, tiny):
    from fluxtrt.engines.load import load_engine_pipeline
    from fluxtrt.lora.engines import apply_to_runner
    from fluxtrt.lora.files import LoraSpec

    text = tmp_path / "notes.safetensors"
    text.write_text("not a LoRA")
    with pytest.raises(InputError, match="is not a readable safetensors file") as info:
        read(text)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="the scale 'strong' is not a number"):
        LoraSpec.parse(f"{text}:strong")
    a4, b4 = torch.randn(4, 32), torch.randn(32, 4)
    encoder = write_lora(tmp_path / "te.safetensors", {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": a4,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": b4})  # fmt: skip
    with pytest.raises(InputError, match="text encoders"):
        read(encoder)
    unknown = read(write_lora(tmp_path / "unknown.safetensors", {
        "transformer.transformer_blocks.7.attn.to_q.lora_A.weight": a4,
        "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": b4}))  # fmt: skip
    misfit = read(write_lora(tmp_path / "misfit.safetensors", {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 99),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b4}))  # fmt: skip
    with load_engine_pipeline(ort_engines, "cpu") as pipeline:
        base = edit(pipeline)
        runner = pipeline.runners["transformer"]
        with pytest.raises(InputError, match=r"match no linear .*transformer_blocks\.7\.attn\.to_q"):
            apply_to_runner(runner, [unknown])
        with pytest.raises(InputError, match=r"transformer_blocks\.0\.attn\.to_q has lora_A \(4, 99\)"):
            apply_to_runner(runner, [misfit])
        assert torch.equal(edit(pipeline), base)


def test_infer_lora_on_the_model_and_a_bad_scale(image_file, tmp_path, loras):
    from tests.conftest import one_error_line, run_cli

    out = tmp_path / "out.png"
    result = run_cli("infer", "--model", "tiny", "--device", "cpu", "--image", str(image_file), "--prompt", "red",
                     "--steps", "2", "--height", "64", "--width", "64", "--out", str(out), "--lora",
                     f"{loras['a'][0]}:0.5")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.is_file() and "LoRA a:0.5" in result.output
    result = run_cli("infer", "--model", "tiny", "--device", "cpu", "--image", str(image_file), "--prompt", "red",
                     "--out", str(tmp_path / "x.png"), "--lora", f"{loras['a'][0]}:lots")  # fmt: skip
    assert result.exit_code != 0 and "the scale 'lots' is not a number" in one_error_line(result)
    assert not (tmp_path / "x.png").exists()


def test_aoti_external_weights_lora_equals_pytorch_fused(tiny, aoti_engines, loras):
    """The tiny AOTInductor transformer (external weights, fused QKV projections) with a LoRA against PyTorch."""
    from fluxtrt.lora.engines import apply_to_runner
    from fluxtrt.lora.fuse import fuse, unfuse
    from fluxtrt.pipeline.kontext import KontextPipeline

    def small(pipeline):
        # The reference at its own 64x64 (not its preferred ~1 MP): inside the engine's 32..128 px range.
        return pipeline.edit(make_image(64, 64), "red", seed=3, height=64, width=64, max_area=64 * 64,
                             auto_resize=False).latents  # fmt: skip

    lora = read(loras["a"][0], 0.8)
    pipeline = KontextPipeline.from_components(tiny)
    want_base = small(pipeline)
    originals = fuse(tiny.transformer, [lora])
    try:
        want_lora = small(pipeline)
    finally:
        unfuse(tiny.transformer, originals)
    runner = aoti_engines["transformer"]
    engine = KontextPipeline.from_components(tiny, runners={**pipeline.runners, "transformer": runner})
    base = small(engine)
    tolerance = max(10 * rel(base, want_base), 1e-5)
    try:
        apply_to_runner(runner, [lora])
        with_lora = small(engine)
        assert rel(with_lora, want_lora) <= tolerance
        assert rel(with_lora, base) > 100 * tolerance
    finally:
        apply_to_runner(runner, [])
    assert torch.equal(small(engine), base)  # removal: the original constants, bit for bit


def test_compare_edits_every_row_with_the_lora(ort_engines, loras, tmp_path):
    """`compare --lora`: the stage and the engines both edit with it (their fidelity is like for like), each row
    names it, and the engines' per-step error is against PyTorch with the LoRA fused (an FP32 engine's own error)."""
    import json

    from fluxtrt.bench.compare import compare
    from fluxtrt.bench.config import CompareConfig
    from fluxtrt.bench.contenders import EngineContender, StageContender
    from fluxtrt.config import SamplerConfig
    from fluxtrt.specs.flux import Resolution

    stage = "0:solver=dpmpp-2m:sigmas=log-snr:steps=2"  # the engines' sampler, so that the edits are the same
    config = CompareConfig(model="tiny", stages=(stage,), engines=(ort_engines,), report_dir=tmp_path, runs=1,
                           warmup=0, device="cpu", resolution=Resolution(SIZE, SIZE),
                           loras=(f"{loras['a'][0]}:0.7",))  # fmt: skip
    contenders = [StageContender(stage), EngineContender(ort_engines, SamplerConfig(steps=2), first_block_cache=None)]
    report = compare(config, contenders=contenders)
    assert not report.failed
    torch_row, engine_row = report.contenders
    assert all("LoRA a:0.7" in row.what for row in (torch_row, engine_row))
    assert engine_row.details["step_error"]["max_rel_l2"] < 1e-4
    assert engine_row.runs[0].fidelity["latent_cosine"] > 0.9999
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["config"]["loras"] == [{"file": str(loras["a"][0]), "scale": 0.7}]
    assert "LoRA a:0.7" in (tmp_path / "report.md").read_text()
