"""The slim VAE (``--vae``: AutoencoderTiny with 16 latent channels, TAEF1's shape) and the 24 GB mode
(``--low-vram``, ``lowvram=on``): oracles against diffusers, ONNX parity, one-line refusals, equality with the normal
edit and the placement the mode promises, counted."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fluxtrt.config import SamplerConfig
from fluxtrt.errors import InputError
from fluxtrt.specs import Resolution
from tests.conftest import make_image, one_error_line, run_cli

STEPS = 4
MAX_AREA = 128 * 128


@pytest.fixture(scope="module")
def tiny_taef1():
    """The tiny model with the random slim autoencoder in place of its VAE."""
    from fluxtrt.models import load_components

    return load_components("tiny", "cpu", "fp32", seed=0, vae="tiny")


# --- slim VAE -------------------------------------------------------------------------------------------------------


def test_slim_vae_has_taesd_architecture_with_16_channels_and_flux_latent_space(tiny_taef1):
    """TAEF1 is TAESD (AutoencoderTiny's defaults) with 16 latent channels; scaling 1 and shift 0 make the pipeline's
    z = (latent - shift) * scaling the identity."""
    from diffusers import AutoencoderTiny

    from fluxtrt.pipeline.kontext import KontextPipeline

    vae = tiny_taef1.vae
    taesd16 = AutoencoderTiny(latent_channels=16).state_dict()
    assert {k: v.shape for k, v in vae.state_dict().items()} == {k: v.shape for k, v in taesd16.items()}
    assert sum(p.numel() for p in vae.parameters()) == sum(v.numel() for v in taesd16.values())
    assert vae.config.latent_channels == 16
    pipeline = KontextPipeline.from_components(tiny_taef1)
    assert (pipeline.vae_scaling, pipeline.vae_shift) == (1.0, 0.0)
    assert pipeline.dims.vae_scale == 8 and pipeline.dims.latent_channels == 16


def test_slim_vae_runners_equal_autoencoder_tiny_called_directly(tiny_taef1):
    from diffusers import AutoencoderTiny

    from fluxtrt.backends.torch_runner import torch_runners

    oracle = AutoencoderTiny(latent_channels=16).eval()
    oracle.load_state_dict(tiny_taef1.vae.state_dict())
    runners = torch_runners(tiny_taef1)
    image = torch.rand(2, 3, 48, 80) * 2 - 1
    latent = torch.randn(2, 16, 6, 10)
    with torch.no_grad():
        want_latent = oracle.encode(image).latents
        want_image = oracle.decode(latent).sample
    got_latent = runners["vae_encoder"].infer({"image": image})["latent"]
    got_image = runners["vae_decoder"].infer({"latent": latent})["image"]
    assert got_latent.shape == (2, 16, 6, 10) and got_image.shape == (2, 3, 48, 80)
    torch.testing.assert_close(got_latent, want_latent, atol=0, rtol=0)
    torch.testing.assert_close(got_image, want_image, atol=0, rtol=0)


def test_slim_vae_edit_matches_diffusers_kontext_pipeline(tiny_taef1):
    """The latent convention against diffusers' own FLUX usage of AutoencoderTiny: its pipeline computes
    (latent - shift) * scaling with the tiny VAE's config, so equal latents mean equal conventions."""
    from fluxtrt.pipeline.kontext import KontextPipeline

    image = make_image(256, 256, seed=1)
    ours = KontextPipeline.from_components(tiny_taef1).edit(
        image, "make it snow", sampler=SamplerConfig("euler", "flux-shift", STEPS), seed=7, height=128, width=128,
        max_area=MAX_AREA,
    )  # fmt: skip
    pipe = tiny_taef1.diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(image=image, prompt="make it snow", height=128, width=128, max_area=MAX_AREA,
                  num_inference_steps=STEPS, guidance_scale=2.5, generator=torch.Generator().manual_seed(7),
                  output_type="latent").images  # fmt: skip
    assert ours.latents.shape == theirs.shape
    assert (ours.latents - theirs.float()).abs().max().item() <= 1e-4


def test_slim_vae_edit_end_to_end(tmp_path):
    image, out = tmp_path / "in.png", tmp_path / "out.png"
    make_image(96, 96).save(image)
    result = run_cli("infer", "--model", "tiny", "--vae", "tiny", "--image", str(image), "--prompt", "blue",
                     "--out", str(out), "--steps", "2", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    edited = Image.open(out)
    assert edited.size == (1024, 1024) and edited.mode == "RGB"  # a square reference's preferred resolution
    pixels = np.asarray(edited, dtype=np.float32)
    assert pixels.min() >= 0 and pixels.max() <= 255 and pixels.std() > 1  # decoded, clamped, not a constant


def _bad_vae_dirs(tmp_path):
    from diffusers import AutoencoderKL, AutoencoderTiny

    no_config = tmp_path / "empty"
    no_config.mkdir()
    kl = tmp_path / "kl"
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8).save_pretrained(kl)
    taesd = tmp_path / "taesd"
    AutoencoderTiny(latent_channels=4).save_pretrained(taesd)
    corrupt = tmp_path / "corrupt"
    AutoencoderTiny(latent_channels=16).save_pretrained(corrupt)
    (corrupt / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{")
    return {
        str(tmp_path / "missing"): "neither tiny nor a directory",
        str(no_config): "no config.json",
        str(kl): "is a AutoencoderKL model",
        str(taesd): "has 4 latent channels",
        str(corrupt): "could not be loaded",
        str(bad_json): "not valid JSON",
    }


def test_bad_vae_paths_are_refused_in_one_line(tmp_path):
    image, out = tmp_path / "in.png", tmp_path / "out.png"
    make_image(64, 64).save(image)
    for path, expected in _bad_vae_dirs(tmp_path).items():
        result = run_cli("infer", "--model", "tiny", "--vae", path, "--image", str(image), "--prompt", "p",
                         "--out", str(out), "--device", "cpu")  # fmt: skip
        line = one_error_line(result)
        assert expected in line and path in line, line
        assert not out.exists()


def test_slim_vae_onnx_matches_onnxruntime_and_is_recorded(tiny_taef1, tmp_path):
    """``build --vae tiny``: the exported encoder and decoder run in ONNX Runtime as in PyTorch, and the manifest
    carries the slim VAE's latent normalisation (identity) and identity."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fluxtrt.backends.base import LoadJob, get_backend
    from fluxtrt.backends.torch_runner import torch_runners
    from fluxtrt.engines.build import build_engines
    from fluxtrt.engines.manifest import Manifest
    from fluxtrt.models.loading import model_fingerprint
    from fluxtrt.specs import component_specs
    from tests.conftest import ort_config

    out = tmp_path / "engines"
    build_engines(ort_config(out, components=("vae_encoder", "vae_decoder"), vae="tiny"))
    manifest = Manifest.load(out)
    assert (manifest.model.vae_scaling, manifest.model.vae_shift, manifest.model.vae) == (1.0, 0.0, "tiny")
    assert manifest.model.fingerprint == model_fingerprint("tiny", vae="tiny") != model_fingerprint("tiny")
    backend, specs = get_backend("onnxruntime"), component_specs(manifest.dims)
    torch_runner = torch_runners(tiny_taef1)
    feeds = {"vae_encoder": {"image": torch.rand(2, 3, 272, 400) * 2 - 1},
             "vae_decoder": {"latent": torch.randn(2, 16, 34, 50)}}  # fmt: skip
    for name, feed in feeds.items():
        entry = manifest.components[name]
        job = LoadJob(specs[name], out / entry.engine.path, "cpu", torch.float32, entry.profile,
                      backend.options(entry.settings.get("options", {})), entry.record)  # fmt: skip
        with backend.load(job) as ort:
            got, want = ort.infer(feed), torch_runner[name].infer(feed)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4)


# --- stage specs and compare ---------------------------------------------------------------------------------------


def test_stage_overrides_vae_and_lowvram():
    from fluxtrt.bench.config import CompareConfig
    from fluxtrt.stages import stage_config

    tiny = stage_config("4:vae=tiny")
    assert tiny.vae == "tiny" and tiny.compile_vae and "slim VAE (AutoencoderTiny)" in tiny.features()
    assert not stage_config("4:vae=off").compile_vae and stage_config("4:vae=off").vae == "full"
    assert stage_config("4:lowvram=on").low_vram and not stage_config("4").low_vram
    for bad in ("4:vae=small", "4:lowvram=maybe"):
        with pytest.raises(InputError):
            stage_config(bad)
    with pytest.raises(InputError, match="add one such as 4:vae=tiny"):
        CompareConfig(model="tiny", stages=("0",), vae="tiny")


def test_compare_shows_slim_vae_and_low_vram_rows(tmp_path):
    from fluxtrt.bench.compare import compare
    from fluxtrt.bench.config import CompareConfig

    stages = ("0:steps=2", "0:steps=2:vae=tiny", "0:steps=2:lowvram=on")
    config = CompareConfig(model="tiny", stages=stages, report_dir=tmp_path, resolution=Resolution(64, 64), runs=1,
                           warmup=0, device="cpu")  # fmt: skip
    report = compare(config)
    assert not report.failed
    by_name = {c.name: c for c in report.contenders}
    assert "slim VAE (AutoencoderTiny)" in by_name[stages[1]].what
    assert by_name[stages[2]].details["low_vram"] and not by_name[stages[0]].details["low_vram"]
    fid_tiny = by_name[stages[1]].runs[0].fidelity
    fid_low = by_name[stages[2]].runs[0].fidelity
    assert fid_tiny is not None and fid_tiny["psnr_db"] < 100  # another autoencoder: not stage 0's image
    assert fid_low["psnr_db"] == 100 and fid_low["latent_cosine"] == pytest.approx(1.0)  # the same edit
    markdown = (tmp_path / "report.md").read_text()
    assert "random here, so that fidelity is meaningless" in markdown
    summary = json.loads((tmp_path / "report.json").read_text())["contenders"]
    assert {"peak_gpu_reserved_gib", "prepare_peak_gpu_mem_gib"} <= set(summary[0])


# --- 24 GB mode -----------------------------------------------------------------------------------------------------


def _stage_edit(staged, spec, image):
    from fluxtrt.pipeline.kontext import KontextPipeline
    from fluxtrt.stages import stage_config

    config = stage_config(spec)
    applied = staged.apply(config)
    pipeline = KontextPipeline.from_components(staged.components, runners=applied.runners)
    return pipeline, pipeline.edit(image, "make it blue", sampler=config.sampler, height=64, width=64,
                                   max_area=64 * 64)  # fmt: skip


def test_low_vram_edit_equals_normal_edit_and_keeps_text_encoders_on_the_host():
    """Same weights, same numbers; while the transformer runs no text-encoder tensor is on the device and every one
    is its host copy; T5 went through one group at a time, each once per edit."""
    from fluxtrt.models import load_components
    from fluxtrt.stages import stage_config
    from fluxtrt.stages.apply import StagedModel
    from fluxtrt.stages.lowvram import load_low_vram

    spec = "4:compile=off:steps=3"
    image = make_image(128, 128)  # square: a 1024x1024 reference, not over the FLUX VAE's tile size
    _, normal = _stage_edit(StagedModel(load_components("tiny", "cpu", "fp32")), spec, image)
    staged = load_low_vram("tiny", "cpu", "fp32", stage_config(spec + ":lowvram=on"))
    offloads = staged.offloads
    seen = []
    first_block = staged.components.transformer.transformer_blocks[0]  # runs every step, cached or not

    def probe(module, args):
        seen.append({name: o.resident_bytes for name, o in offloads.items()})
        host = all(t.data_ptr() == h.data_ptr() for o in offloads.values() for g in o._host for t, h in g)
        seen[-1]["host"] = host

    handle = first_block.register_forward_pre_hook(probe)
    try:
        _, low = _stage_edit(staged, spec + ":lowvram=on", image)
    finally:
        handle.remove()
    assert torch.equal(low.latents, normal.latents)
    assert np.array_equal(np.asarray(low.images[0]), np.asarray(normal.images[0]))
    assert len(seen) == 3 and all(s == {"clip": 0, "t5": 0, "host": True} for s in seen)
    t5 = offloads["t5"]
    sizes = [sum(h.numel() * h.element_size() for _, h in group) for group in t5._host]
    assert len(sizes) == 2 + staged.components.text_encoder_2.config.num_layers  # embedding, blocks, final norm
    assert t5.onloads == len(sizes) and t5.max_resident_bytes == max(sizes) and t5.resident_bytes == 0
    assert offloads["clip"].onloads == 1


def test_low_vram_loads_the_transformer_block_by_block_with_the_same_weights():
    """random-full's path on the tiny config: each block is allocated and placed before the next exists, and the
    weights equal the directly built model's."""
    from fluxtrt.models.lowvram import materialize, meta_transformer
    from fluxtrt.models.synthetic import TINY, build_transformer

    model = meta_transformer(TINY.transformer, torch.float32)
    blocks = {f"{n}.{i}": b for n in ("transformer_blocks", "single_transformer_blocks")
              for i, b in enumerate(getattr(model, n))}  # fmt: skip
    placed = []

    def place(name, block):
        assert blocks[name] is block and not any(p.is_meta for p in block.parameters())
        later = [b for n, b in blocks.items() if n not in placed and n != name]
        assert all(p.is_meta for b in later for p in b.parameters())  # not allocated yet
        placed.append(name)

    materialize(model, 0, "cpu", place)
    assert placed == list(blocks) == ["transformer_blocks.0", "single_transformer_blocks.0"]
    want = build_transformer(TINY.transformer, 0, "cpu", torch.float32).state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_low_vram_drops_unfused_projections_and_tiles_the_full_vae_over_its_tile_size():
    """Fused QKV frees the unfused projections (6 per double block, 3 per single); the FLUX VAE is tiled only above
    1024 px a side (diffusers' rule with FLUX's tile size): a 1024x1024 reference encodes as without the mode, a
    1248x832 one as diffusers' tiled encode."""
    from fluxtrt.models import load_components
    from fluxtrt.stages import stage_config
    from fluxtrt.stages.apply import StagedModel
    from fluxtrt.stages.lowvram import load_low_vram

    config = stage_config("4:compile=off:lowvram=on")
    staged = load_low_vram("tiny", "cpu", "fp32", config)
    low = staged.apply(config).runners["vae_encoder"]
    transformer = staged.components.transformer
    dropped = [n for n, m in transformer.named_modules() if n.endswith(("to_q", "add_q_proj")) and
               all(p.is_meta for p in m.parameters())]  # fmt: skip
    assert len(dropped) == 3 and not any(p.is_meta for n, p in transformer.named_parameters() if "qkv" in n)
    plain = StagedModel(load_components("tiny", "cpu", "fp32")).apply(stage_config("4:compile=off")).runners
    square = torch.rand(1, 3, 1024, 1024) * 2 - 1
    assert torch.equal(low.infer({"image": square})["latent"], plain["vae_encoder"].infer({"image": square})["latent"])
    wide = torch.rand(1, 3, 832, 1248) * 2 - 1
    got = low.infer({"image": wide})["latent"]
    vae = staged.components.vae
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # tiled_encode's return_dict is deprecated, not its result
        tiled = vae.tiled_encode(wide).latent_dist.mode()
    assert torch.equal(got, tiled)
    assert not torch.equal(got, plain["vae_encoder"].infer({"image": wide})["latent"])


def test_infer_low_vram_writes_the_same_image_and_refuses_engines(tmp_path):
    image = tmp_path / "in.png"
    make_image(96, 96).save(image)
    outs = []
    for extra in ((), ("--low-vram",)):
        outs.append(tmp_path / f"out{len(outs)}.png")
        result = run_cli("infer", "--model", "tiny", "--image", str(image), "--prompt", "blue", "--out", str(outs[-1]),
                         "--steps", "2", "--device", "cpu", *extra)  # fmt: skip
        assert result.exit_code == 0, result.stderr
    assert np.array_equal(np.asarray(Image.open(outs[0])), np.asarray(Image.open(outs[1])))
    result = run_cli("infer", "--engines", str(tmp_path), "--low-vram", "--image", str(image), "--prompt", "p",
                     "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert "--low-vram applies to --model" in one_error_line(result)
