"""Component specs: shapes derived from resolutions, feed validation, the tiny model through a saved checkpoint."""

from __future__ import annotations

import pytest
import torch

from fluxtrt.errors import ShapeError
from fluxtrt.specs import Resolution, component_specs
from fluxtrt.specs.flux import FLUX_KONTEXT_DIMS, component_dims, dims_from_components, profile_shapes

FULL_DIMS = FLUX_KONTEXT_DIMS


def test_full_size_shapes_follow_design_table():
    specs = component_specs(FULL_DIMS)
    r1024 = Resolution(1024, 1024)
    dims = component_dims("transformer", FULL_DIMS, 1, r1024, r1024)
    # 1024x1024 target + 1024x1024 reference: (1024/16)^2 tokens each.
    assert specs["transformer"].shapes(dims)["hidden_states"] == (1, 64 * 64 * 2, 64)
    assert specs["t5"].outputs[0].concrete({"B": 2}) == (2, 512, 4096)
    enc = component_dims("vae_encoder", FULL_DIMS, 1, Resolution(1392, 752), Resolution(1024, 1024))
    assert specs["vae_encoder"].outputs[0].concrete(enc) == (1, 16, 128, 128)
    dec = component_dims("vae_decoder", FULL_DIMS, 1, Resolution(1392, 752), Resolution(1024, 1024))
    assert specs["vae_decoder"].outputs[0].concrete(dec) == (1, 3, 752, 1392)


def test_profile_shapes_derive_from_resolution_range():
    spec = component_specs(FULL_DIMS)["transformer"]
    lo, opt, hi = Resolution(512, 512), Resolution(1024, 1024), Resolution(1568, 1568)
    prof = profile_shapes(spec, FULL_DIMS, (1, 1, 2), (lo, opt, hi))
    seq = [s[1] for s in prof["hidden_states"]]
    assert seq == [2 * (512 // 16) ** 2, 2 * (1024 // 16) ** 2, 2 * (1568 // 16) ** 2]
    assert [s[0] for s in prof["img_ids"]] == seq
    assert [s[0] for s in prof["hidden_states"]] == [1, 1, 2]
    assert spec.dynamic_axes()["hidden_states"] == {0: "B", 1: "S"}
    assert spec.dynamic_axes()["txt_ids"] == {}


def test_resolution_parse():
    assert Resolution.parse("1392x752") == Resolution(1392, 752)
    from fluxtrt.errors import InputError

    for bad in ("1024", "ax5", "0x512", "-16x16"):
        with pytest.raises(InputError, match=bad):
            Resolution.parse(bad)


def test_shape_error_names_the_disagreeing_inputs(tiny):
    from fluxtrt.backends.torch_runner import torch_runners

    runner = torch_runners(tiny)["transformer"]
    dims = dims_from_components(tiny)
    feed = runner.spec.sample_feed(
        component_dims("transformer", dims, 1, Resolution(64, 64), Resolution(64, 64)), torch.float32
    )
    with pytest.raises(ShapeError, match="img_ids has S=5 .* hidden_states has S=32"):
        runner.infer({**feed, "img_ids": feed["img_ids"][:5]})
    with pytest.raises(ShapeError, match="txt_ids has size 7 on axis 0, expected 512"):
        runner.infer({**feed, "txt_ids": torch.zeros(7, 3)})


def test_tiny_saved_and_loaded_from_path_edits_identically(tiny, tiny_pipeline, tmp_path):
    """`--model PATH` loads a diffusers-format directory: the tiny model round-trips through it."""
    from fluxtrt.config import SamplerConfig
    from fluxtrt.models import load_components
    from fluxtrt.pipeline.kontext import KontextPipeline
    from tests.conftest import make_image

    tiny.save_pretrained(tmp_path / "ckpt")
    loaded = load_components(str(tmp_path / "ckpt"), "cpu", "fp32")
    kwargs = dict(sampler=SamplerConfig("euler", "flux-shift", 2), seed=1, height=64, width=64, max_area=64 * 64)
    image = make_image(200, 120)
    a = tiny_pipeline.edit(image, "a prompt", **kwargs)
    b = KontextPipeline.from_components(loaded).edit(image, "a prompt", **kwargs)
    # Same weights bit for bit; the reloaded tensors may take other CPU kernel paths (alignment), so allow rounding.
    for name, module in tiny.modules().items():
        reloaded = loaded.modules()[name].state_dict()
        assert all(torch.equal(v, reloaded[k]) for k, v in module.state_dict().items()), name
    assert (a.latents - b.latents).abs().max() <= 1e-5
    assert loaded.tokenizer("a prompt").input_ids == tiny.tokenizer("a prompt").input_ids
    assert loaded.tokenizer_2("a prompt").input_ids == tiny.tokenizer_2("a prompt").input_ids


def test_truncation_is_reported(tiny_pipeline):
    from fluxtrt.config import SamplerConfig
    from tests.conftest import make_image

    long_prompt = " ".join(["purple"] * 60)  # > 77 CLIP tokens with the tiny byte-level vocabulary
    result = tiny_pipeline.edit(
        make_image(64, 64),
        long_prompt,
        sampler=SamplerConfig("euler", "flux-shift", 1),
        height=32,
        width=32,
        max_area=32 * 32,
    )
    assert any(w.startswith("prompt 0: CLIP keeps 77 of") for w in result.warnings)
    assert not any("T5" in w for w in result.warnings)
