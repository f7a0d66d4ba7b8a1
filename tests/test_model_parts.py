"""Loading a subset of a model's parts: each part has exactly the weights a whole load gives it, and the parts not
asked for are not built."""

from __future__ import annotations

import pytest
import torch

from fluxtrt.models import load_components
from fluxtrt.models.components import PARTS
from fluxtrt.models.loading import part_parameters
from fluxtrt.models.options import ModelOptions, load_model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def whole():
    return load_components("tiny")


@pytest.mark.parametrize("parts", [("transformer",), ("vae",), ("text_encoder",), ("text_encoder_2",),
                                   ("text_encoder_2", "vae")])  # fmt: skip
def test_a_subset_of_tiny_has_the_weights_of_the_whole_model(whole, parts):
    subset = load_components("tiny", parts=parts)
    for name in PARTS:
        if name in parts:
            assert_same_weights(getattr(subset, name), getattr(whole, name))
        else:
            assert getattr(subset, name) is None, name
    assert set(subset.modules()) == set(parts)
    assert subset.tokenizer.model_max_length == whole.tokenizer.model_max_length  # tokenizers always come


def test_a_subset_in_bf16_is_the_whole_model_cast(whole):
    subset = load_components("tiny", dtype="bf16", parts=("vae",))
    assert_same_weights(subset.vae, load_components("tiny", dtype="bf16").vae)
    assert subset.vae.dtype == torch.bfloat16


def test_a_checkpoint_loads_only_the_subfolders_asked_for(whole, tmp_path):
    whole.save_pretrained(tmp_path / "ckpt")
    subset = load_components(str(tmp_path / "ckpt"), parts=("text_encoder",))
    assert subset.transformer is None and subset.vae is None and subset.text_encoder_2 is None
    assert_same_weights(subset.text_encoder, whole.text_encoder)
    # The parameter counts read from the safetensors headers are those of the loaded modules.
    for name in PARTS:
        assert part_parameters(str(tmp_path / "ckpt"), name) == sum(
            p.numel() for p in getattr(whole, name).parameters()
        )


def test_part_parameters_of_tiny_count_the_modules(whole):
    for name in PARTS:
        assert part_parameters("tiny", name) == sum(p.numel() for p in getattr(whole, name).parameters())


def test_model_options_pass_parts_and_refuse_unknown_ones(whole):
    loaded = load_model(ModelOptions("tiny", parts=("transformer",)))
    assert_same_weights(loaded.components.transformer, whole.transformer)
    assert loaded.components.vae is None
    with pytest.raises(ValueError, match="unknown model parts unet"):
        load_components("tiny", parts=("unet",))
    with pytest.raises(ValueError, match="24 GB mode"):
        ModelOptions("tiny", low_vram=True, parts=("vae",))


def test_random_full_part_counts_are_the_architecture():
    """The per-part constants the build's memory planning uses are what the full-size architecture has (meta)."""
    from fluxtrt.models.synthetic import FULL, FULL_PART_PARAMETERS
    from fluxtrt.models.synthetic import part_parameters as counted

    for name in PARTS:
        assert counted(FULL, name) == FULL_PART_PARAMETERS[name], name


def test_random_full_2blocks_has_the_full_widths_and_two_blocks_of_each_kind():
    """The GPU tier's model: FLUX.1-Kontext's widths (24 heads x 128 in the transformer, T5's 4096, CLIP-L's 768, the
    VAE's channels) with two double and two single blocks; counted on the meta device, nothing allocated."""
    import torch

    from fluxtrt.models.loading import part_parameters
    from fluxtrt.models.synthetic import FULL, FULL_2BLOCKS, build_transformer

    with torch.device("meta"):
        transformer = build_transformer(FULL_2BLOCKS.transformer, 0, "meta", torch.bfloat16)
    assert len(transformer.transformer_blocks) == 2 and len(transformer.single_transformer_blocks) == 2
    assert transformer.inner_dim == 24 * 128 == 3072
    assert FULL_2BLOCKS.vae == FULL.vae and FULL_2BLOCKS.t5["d_model"] == FULL.t5["d_model"] == 4096
    blocks = sum(p.numel() for p in transformer.transformer_blocks.parameters())
    singles = sum(p.numel() for p in transformer.single_transformer_blocks.parameters())
    # Every block of the full model has the same size: 19 double and 38 single blocks there, 2 and 2 here.
    full = part_parameters("random-full", "transformer")
    assert part_parameters("random-full-2blocks", "transformer") == full - 17 * blocks // 2 - 36 * singles // 2
