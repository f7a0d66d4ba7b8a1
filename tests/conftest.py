"""Shared fixtures: the tiny model (built once per session) and small synthetic reference images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


def pytest_configure(config):
    torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny():
    """The tiny model, fp32 on the CPU."""
    from fluxtrt.models import load_components

    return load_components("tiny", "cpu", "fp32", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny):
    from fluxtrt.pipeline.kontext import KontextPipeline

    return KontextPipeline.from_components(tiny)


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (low-frequency noise, so resizing is meaningful)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 32, 2), max(width // 32, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "input.png"
    make_image(320, 240).save(path)
    return path


def run_cli(*args: str):
    """Invoke the real ``fluxtrt`` CLI in-process; stdout and stderr are kept apart."""
    from click.testing import CliRunner

    from fluxtrt.cli import main

    return CliRunner().invoke(main, list(args))


def one_error_line(result) -> str:
    """The single ``error:`` line a failed command must print (and its non-zero exit)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
