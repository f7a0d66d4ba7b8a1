"""Frozen, torch-free configurations built by the CLI (or by code) and handed to one public function each.

Validation that needs no model happens here, before anything heavy is loaded, so bad input fails in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fluxtrt.errors import InputError

DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16")
SOLVERS = ("euler", "dpmpp-2m")
SIGMA_SCHEDULES = ("flux-shift", "karras")

DEFAULT_GUIDANCE = 2.5
DEFAULT_SEED = 0
DEFAULT_STEPS = {"euler": 28, "dpmpp-2m": 14}


def _one_of(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{option} is '{value}', expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class SamplerConfig:
    """How the denoising loop integrates the flow: solver, sigma schedule and step count.

    Args:
        solver: ``euler`` or ``dpmpp-2m``.
        sigmas: ``flux-shift`` (FLUX's resolution-shifted schedule) or ``karras``.
        steps: model calls per edit; ``None`` takes the solver's default (28 Euler, 14 DPM-Solver++ 2M).
    """

    solver: str = "dpmpp-2m"
    sigmas: str = "flux-shift"
    steps: int | None = None

    def __post_init__(self) -> None:
        _one_of("--scheduler", self.solver, SOLVERS)
        _one_of("--sigmas", self.sigmas, SIGMA_SCHEDULES)
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps is {self.steps}, expected an integer >= 1")

    @property
    def num_steps(self) -> int:
        return self.steps if self.steps is not None else DEFAULT_STEPS[self.solver]


@dataclass(frozen=True)
class InferConfig:
    """One image edit from the command line.

    Args:
        model: ``tiny``, ``random-full``, a diffusers-format FLUX.1-Kontext directory or a cached hub id.
        image: reference image to edit.
        prompt: the edit instruction.
        out: PNG to write (written atomically).
        sampler: solver, sigma schedule and steps.
        seed: seed of the initial noise.
        guidance: distilled-guidance scale fed to the transformer.
        height, width: target size; both or neither. ``None`` keeps the reference's preferred Kontext resolution.
        device: ``cpu`` or ``cuda``.
        dtype: ``fp32``, ``bf16`` or ``auto`` (bf16 on CUDA, fp32 on CPU).
    """

    model: str
    image: Path
    prompt: str
    out: Path
    sampler: SamplerConfig = SamplerConfig()
    seed: int = DEFAULT_SEED
    guidance: float = DEFAULT_GUIDANCE
    height: int | None = None
    width: int | None = None
    device: str = "cpu"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        _one_of("--device", self.device, DEVICES)
        _one_of("--dtype", self.dtype, DTYPES)
        for name, value in (("--height", self.height), ("--width", self.width)):
            if value is not None and value <= 0:
                raise InputError(f"{name} is {value}, expected a positive number of pixels (e.g. 1024)")
        if (self.height is None) != (self.width is None):
            raise InputError(
                f"--height is {self.height} and --width is {self.width}: give both, or neither to keep the "
                "reference image's aspect ratio"
            )
        if not self.image.is_file():
            raise InputError(f"--image '{self.image}' does not exist or is not a file: pass a PNG or JPEG path")
        if self.out.exists() and self.out.is_dir():
            raise InputError(f"--out '{self.out}' is a directory, expected a file path such as {self.out}/edit.png")

    @property
    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if self.device == "cuda" else "fp32"
