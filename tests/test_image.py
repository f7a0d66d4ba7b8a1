"""Reference images as users have them: the EXIF orientation applied, and every Pillow mode brought to the 8-bit RGB
picture it shows, each against a conversion computed here with numpy, with one notice where information is dropped."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fluxtrt.pipeline.image import load_image
from tests.conftest import make_image, run_cli

H, W = 24, 40


def gray_ramp(top: int) -> np.ndarray:
    """[H, W] values spanning 0..top, every row different."""
    return (np.arange(H * W).reshape(H, W) * top // (H * W - 1)).astype(np.int64)


def alpha_ramp() -> np.ndarray:
    a = np.linspace(0, 255, W).round().astype(np.uint8)
    return np.broadcast_to(a, (H, W)).copy()


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha composited on white: c a + 255 (1 - a), a in 0..1."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return (rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).round()


def rgb_of_gray(gray: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(gray, dtype=np.float64)[..., None], 3, axis=2)


def loaded(tmp_path, img: Image.Image, name: str) -> tuple[np.ndarray, list[str]]:
    path = tmp_path / name
    img.save(path)
    image, notices = load_image(path)
    assert image.mode == "RGB" and image.size == (W, H)
    return np.asarray(image, dtype=np.float64), notices


def test_exif_orientation_is_applied_so_a_phone_photo_is_edited_upright(tmp_path):
    """Orientation 6: the stored pixels are turned 90 degrees clockwise for display."""
    stored = make_image(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        pixels = np.asarray(raw.convert("RGB"))  # as decoded, 64 wide
    image, notices = load_image(path)
    assert notices == []
    assert image.size == (48, 64)  # displayed: portrait
    assert np.array_equal(np.asarray(image), np.rot90(pixels, k=-1))

    out = tmp_path / "edit.png"
    result = run_cli("infer", "--model", "tiny", "--device", "cpu", "--image", str(path), "--prompt", "p", "--out",
                     str(out), "--steps", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    with Image.open(out) as edit:
        assert edit.height > edit.width, edit.size  # the edit is portrait, as the photo displays


def test_lossless_modes_convert_exactly_and_silently(tmp_path):
    gray = gray_ramp(255)
    bits = gray > 127
    got, notices = loaded(tmp_path, Image.fromarray(bits), "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    assert np.array_equal(got, rgb_of_gray(bits * 255.0)) and notices == []

    got, notices = loaded(tmp_path, Image.fromarray(gray.astype(np.uint8), "L"), "gray.png")
    assert np.array_equal(got, rgb_of_gray(gray)) and notices == []

    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    index = (gray % 16).astype(np.uint8)
    pal = Image.frombytes("P", (W, H), index.tobytes())
    pal.putpalette(palette.flatten().tolist())
    got, notices = loaded(tmp_path, pal, "pal.png")
    assert Image.open(tmp_path / "pal.png").mode == "P"
    assert np.array_equal(got, palette[index].astype(np.float64)) and notices == []

    opaque = np.dstack([make_image(W, H), np.full((H, W), 255, np.uint8)])
    got, notices = loaded(tmp_path, Image.fromarray(opaque, "RGBA"), "opaque.png")
    assert np.array_equal(got, opaque[..., :3]) and notices == []


def test_transparency_is_composited_on_white_with_one_notice(tmp_path):
    alpha = alpha_ramp()
    rgb = np.asarray(make_image(W, H))
    got, notices = loaded(tmp_path, Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "rgba.png")
    assert np.abs(got - on_white(rgb, alpha)).max() <= 1
    assert len(notices) == 1 and "composited on white" in notices[0] and "rgba.png" in notices[0]

    gray = gray_ramp(255).astype(np.uint8)
    got, notices = loaded(tmp_path, Image.fromarray(np.dstack([gray, alpha]), "LA"), "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    assert np.abs(got - on_white(rgb_of_gray(gray), alpha)).max() <= 1
    assert len(notices) == 1 and "composited on white" in notices[0]

    # A palette image with one transparent entry: that colour becomes white.
    palette = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200]] + [[0, 0, 0]] * 253, np.uint8)
    index = (gray_ramp(255) % 3).astype(np.uint8)
    pal = Image.frombytes("P", (W, H), index.tobytes())
    pal.putpalette(palette.flatten().tolist())
    pal.info["transparency"] = 1
    path = tmp_path / "pal_t.png"
    pal.save(path, transparency=1)
    image, notices = load_image(path)
    expected = palette[index].astype(np.float64)
    expected[index == 1] = 255
    assert np.array_equal(np.asarray(image, dtype=np.float64), expected)
    assert len(notices) == 1 and "composited on white" in notices[0]


def test_cmyk_converts_as_ink_on_paper_with_a_notice(tmp_path):
    rng = np.random.default_rng(1)
    cmyk = rng.integers(0, 256, size=(H, W, 4), dtype=np.uint8)
    got, notices = loaded(tmp_path, Image.fromarray(cmyk, "CMYK"), "cmyk.tif")
    assert Image.open(tmp_path / "cmyk.tif").mode == "CMYK"
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = (255 - c) * (255 - k) / 255  # ink absorbs: what is left of white under C (M, Y) and K
    assert np.abs(got - expected).max() <= 1
    assert len(notices) == 1 and "CMYK" in notices[0]


@pytest.mark.parametrize(
    ("values", "dtype", "suffix", "full"),
    [(gray_ramp(65535), np.uint16, "png", 65535), (gray_ramp(65535), np.int32, "tif", 65535)],
)
def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(tmp_path, values, dtype, suffix, full):
    path = tmp_path / f"deep.{suffix}"
    Image.fromarray(values.astype(dtype)).save(path)
    mode = Image.open(path).mode
    assert mode in ("I;16", "I"), mode
    image, notices = load_image(path)
    got = np.asarray(image, dtype=np.float64)
    assert np.array_equal(got, rgb_of_gray((values * 255 / full).round()))
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) > 200  # not a white page
    assert len(notices) == 1 and "reduced to 8 bits" in notices[0] and mode in notices[0]


def test_float_images_scale_from_0_1_and_out_of_range_values_are_stretched(tmp_path):
    unit = gray_ramp(1000) / 1000.0
    path = tmp_path / "float.tif"
    Image.fromarray(unit.astype(np.float32), "F").save(path)
    assert Image.open(path).mode == "F"
    image, notices = load_image(path)
    assert np.abs(np.asarray(image, dtype=np.float64) - rgb_of_gray(unit * 255)).max() <= 0.5 + 1e-6
    assert len(notices) == 1 and "(F)" in notices[0]

    wide = gray_ramp(1000) * 3.0 - 500.0  # -500..2500: no 0..1 image
    path = tmp_path / "wide.tif"
    Image.fromarray(wide.astype(np.float32), "F").save(path)
    image, notices = load_image(path)
    expected = (wide - wide.min()) * 255 / (wide.max() - wide.min())
    assert np.abs(np.asarray(image, dtype=np.float64) - rgb_of_gray(expected)).max() <= 0.5 + 1e-6
    assert len(notices) == 1 and "stretched" in notices[0]


def test_infer_prints_the_conversion_notice_once(tmp_path):
    rgba = np.dstack([np.asarray(make_image(96, 72)), np.full((72, 96), 128, np.uint8)])
    path, out = tmp_path / "half.png", tmp_path / "edit.png"
    Image.fromarray(rgba, "RGBA").save(path)
    result = run_cli("infer", "--model", "tiny", "--device", "cpu", "--image", str(path), "--prompt", "p", "--out",
                     str(out), "--steps", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    notices = [line for line in result.stderr.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "composited on white" in notices[0], result.stderr
