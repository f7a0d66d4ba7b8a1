"""Edits fitted into the sizes engines were built for (fluxtrt.pipeline.sizes): the geometry by exact arithmetic,
single-size engines of the tiny model editing a non-square photo that they refused before."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fluxtrt.engines.load import load_engine_pipeline
from fluxtrt.errors import InputError
from fluxtrt.pipeline.sizes import PREFERRED, SizeRange, excluded_preferred, fit_geometry, fit_size
from fluxtrt.specs import Resolution
from tests.conftest import make_image, recorded_for, run_cli

R = Resolution
SINGLE = R(256, 256)


# --- the geometry ---------------------------------------------------------------------------------------------------


def test_a_size_inside_the_range_is_kept():
    sizes = SizeRange(R(512, 512), R(1568, 1568))
    for res in [*PREFERRED, R(512, 1568), R(1000, 512)]:
        assert fit_size(res, sizes, 16) == res
    assert fit_geometry(R(1184, 880), R(880, 1184), sizes, 16) == (R(1184, 880), R(880, 1184), [])


@pytest.mark.parametrize(
    ("low", "high"),
    [(R(256, 256), R(256, 256)), (R(1024, 1024), R(1024, 1024)), (R(256, 256), R(512, 512)), (R(100, 90), R(700, 650)),
     (R(256, 256), R(1024, 1024)), (R(64, 512), R(128, 1568)), (R(1024, 768), R(1024, 768))],
)  # fmt: skip
def test_every_size_is_brought_inside_the_range_on_multiples_of_16(low, high):
    sizes = SizeRange(low, high)
    wanted = [*PREFERRED, R(16, 16), R(4096, 16), R(16, 4096), R(640, 480), R(2048, 2048)]
    for res in wanted:
        fitted = fit_size(res, sizes, 16)
        assert sizes.holds(fitted) and fitted.width % 16 == 0 and fitted.height % 16 == 0, (res, fitted)
        if low == high:  # engines of one size take that size
            assert fitted == low


def test_outside_the_range_the_closest_preferred_size_inside_it_is_taken():
    # 640..1184 wide, 640..1184 high holds 880x1184, 944x1104, 1024x1024, 1104x944 and 1184x880.
    sizes = SizeRange(R(640, 640), R(1184, 1184))
    assert fit_size(R(1568, 672), sizes, 16) == R(1184, 880)  # the widest held
    assert fit_size(R(672, 1568), sizes, 16) == R(880, 1184)
    assert fit_size(R(1328, 800), sizes, 16) == R(1184, 880)
    # 256..1024 holds only 1024x1024 of the preferred sizes: a 4:3 photo's target and reference both go there.
    target, reference, notices = fit_geometry(R(1184, 880), R(1184, 880), SizeRange(R(256, 256), R(1024, 1024)), 16)
    assert (target, reference) == (R(1024, 1024), R(1024, 1024)) and len(notices) == 2
    assert "1184x880" in notices[0] and "the edit is made at 1024x1024" in notices[0]


def test_without_a_preferred_size_inside_the_largest_size_at_the_aspect_ratio_is_taken():
    sizes = SizeRange(R(256, 256), R(512, 512))
    # 1184x880 scaled by 512/1184: 512 x 380.5, rounded to a multiple of 16: 512x384.
    assert fit_size(R(1184, 880), sizes, 16) == R(512, 384)
    assert fit_size(R(880, 1184), sizes, 16) == R(384, 512)
    assert fit_size(R(1024, 1024), sizes, 16) == R(512, 512)
    # 1568x672 scaled to 512 x 219.4 -> 224, below the 256 minimum: raised to it.
    assert fit_size(R(1568, 672), sizes, 16) == R(512, 256)
    # Bounds that are no multiples of 16 are rounded inward: 500 -> 496, 250 -> 256.
    assert fit_size(R(1024, 1024), SizeRange(R(250, 250), R(500, 500)), 16) == R(496, 496)


def test_an_explicit_size_fitted_back_to_itself_has_no_notice():
    sizes = SizeRange(R(256, 256), R(512, 512))
    # --width 512 --height 512 is 1024x1024 at 1 MP, fitted back to 512x512: what was asked.
    assert fit_geometry(R(1024, 1024), R(1024, 1024), sizes, 16, asked=R(512, 512))[2] == [
        fit_geometry(R(1024, 1024), R(1024, 1024), sizes, 16)[2][1]
    ]


def test_a_range_without_a_multiple_of_16_refuses_naming_a_range_that_works():
    with pytest.raises(InputError, match=r"hold no width and height .* --min-resolution 672x672 --max-resolution "
                       r"1568x1568"):  # fmt: skip
        fit_size(R(1024, 1024), SizeRange(R(1010, 1010), R(1020, 1020)), 16)


def test_build_range_notice_counts_the_preferred_sizes_it_leaves_out():
    assert excluded_preferred(R(512, 512), R(1568, 1568)) is None  # the default range holds all 17
    single = excluded_preferred(R(1024, 1024), R(1024, 1024))
    assert "excludes 16 of the 17 preferred Kontext sizes (it holds only 1024x1024)" in single
    assert "--min-resolution 672x672 --max-resolution 1568x1568 includes them all" in single
    assert excluded_preferred(R(672, 672), R(1568, 1568)) is None  # what it suggests holds them all
    narrow = excluded_preferred(R(704, 704), R(1568, 1568))  # 672 wide or high: 4 sizes
    assert "excludes 4 of the 17" in narrow and "672x1568, 688x1504, 1504x688, 1568x672" in narrow
    assert "(it holds none of them)" in excluded_preferred(R(256, 256), R(512, 512))


# --- single-size engines of the tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_size(ort_engines, tmp_path_factory):
    """The tiny model's engines for 256x256 only."""
    return recorded_for(ort_engines, tmp_path_factory.mktemp("single") / "engines", SINGLE)


def test_a_build_for_one_size_warns_once_about_the_preferred_sizes(tmp_path):
    """The notice comes before the build starts (here it then stops at once: onnxruntime builds no fp8)."""
    sizes = [f"--{k}-resolution=256x256" for k in ("min", "opt", "max")]
    result = run_cli("build", "--model", "tiny", "--precision", "fp8", "--out", str(tmp_path / "e"), *sizes)
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[1].startswith("error: --precision is 'fp8'"), result.stderr
    assert lines[0].startswith("notice: ") and "excludes 17 of the 17 preferred Kontext sizes" in lines[0]
    assert "--min-resolution 256x256 --max-resolution 1568x1568 includes them all" in lines[0]


def test_single_size_engines_edit_a_non_square_photo_at_their_size(single_size, tiny, tmp_path):
    """A 320x240 photo prefers 1184x880; the engines take 256x256 only: target and reference are made 256x256, each
    with a notice, and the edit is the one PyTorch makes at that geometry."""
    from fluxtrt.config import SamplerConfig
    from fluxtrt.pipeline.kontext import KontextPipeline

    engines = single_size
    photo = make_image(320, 240)
    src, out = tmp_path / "photo.png", tmp_path / "edit.png"
    photo.save(src)
    result = run_cli("infer", "--engines", str(engines), "--device", "cpu", "--image", str(src), "--prompt", "p",
                     "--out", str(out), "--steps", "2")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    notices = [line for line in result.stderr.splitlines() if line.startswith("notice:")]
    assert len(notices) == 2, result.stderr
    assert "the target 1184x880 is outside" in notices[0] and "made at 256x256" in notices[0]
    assert "preferred size 1184x880" in notices[1] and "resized to 256x256" in notices[1]
    assert Image.open(out).size == (256, 256)

    sampler = SamplerConfig(steps=2)
    with load_engine_pipeline(engines, "cpu") as pipeline:
        got = pipeline.edit(photo, "p", sampler=sampler)
    assert (got.target, got.reference) == (SINGLE, SINGLE)
    # The oracle: PyTorch's edit at the same geometry (the reference resized from the photo itself).
    oracle = KontextPipeline.from_components(tiny)
    oracle.sizes = SizeRange(SINGLE, SINGLE)
    want = oracle.edit(photo, "p", sampler=sampler)
    assert (want.target, want.reference) == (SINGLE, SINGLE)
    torch.testing.assert_close(got.latents, want.latents, atol=1e-3, rtol=1e-3)


def test_engines_for_1024x1024_only_edit_a_1184x880_photo_at_1024x1024(single_size, tmp_path):
    """Engines built for 1024x1024 only (--min/--opt/--max-resolution 1024x1024) and --width 1024 --height 1024 with
    a photo whose preferred size is 1184x880: refused before, now the reference is resized to 1024x1024 and the
    edit fits every engine. (ONNX Runtime engines take any shape: the directory is the 256x256 one with the range
    and profiles of a 1024x1024 build recorded.)"""
    only = R(1024, 1024)
    engines = recorded_for(single_size, tmp_path / "engines-1024", only)
    with load_engine_pipeline(engines, "cpu") as pipeline:
        target, reference, notices = pipeline.fitted_geometry((1184, 880), 1024, 1024, 1024**2)
        assert (target, reference) == (only, only)
        assert len(notices) == 1 and "preferred size 1184x880" in notices[0] and "the one size they take" in notices[0]
        pipeline.check_fits(1, target, reference)  # every engine takes it
        with pytest.raises(InputError, match="does not fit the engines"):  # what the edit was before
            pipeline.check_fits(1, target, R(1184, 880))
