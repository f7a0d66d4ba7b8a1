"""Frozen, torch-free configurations built by the CLI (or by code) and handed to one public function each.

Validation that needs no model happens here, before anything heavy is loaded, so bad input fails in milliseconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fluxtrt.errors import InputError
from fluxtrt.io import check_writable
from fluxtrt.specs.flux import BUILDABLE, COMPONENTS, TRANSFORMER_PARTS, Resolution

DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16")
SOLVERS = ("euler", "dpmpp-2m")
SIGMA_SCHEDULES = ("log-snr", "flux-shift", "karras")

DEFAULT_GUIDANCE = 2.5
DEFAULT_SEED = 0
DEFAULT_STEPS = {"euler": 28, "dpmpp-2m": 14}
# DESIGN 3: log-snr is where 14 DPM-Solver++ 2M steps beat 28 Euler steps for narrow and wide data alike; Euler keeps
# diffusers' FLUX schedule, on which it reproduces diffusers exactly.
DEFAULT_SIGMAS = {"euler": "flux-shift", "dpmpp-2m": "log-snr"}
# Relative change of the first block's residual below which a step reuses the cached residual of the others (the
# first-block cache of stages 1-4 and of engines built with --first-block-cache). The skip rate it gives depends on
# the real weights: tune it per checkpoint.
DEFAULT_FBC_THRESHOLD = 0.08
# The image format written for each ``--out`` extension (Pillow's format names).
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _one_of(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{option} is '{value}', expected one of {', '.join(allowed)}")


# Seeds are those of torch.Generator.manual_seed: 0 .. 2**64 - 1. There is no random seed: an edit is reproducible.
MAX_SEED = 2**64 - 1


def check_seed_and_guidance(seed: int, guidance: float) -> None:
    """``--seed``: an integer 0 .. ``MAX_SEED``; ``--guidance``: a finite number >= 0 (FLUX.1-Kontext was distilled
    for about 1 to 4; a negative scale is no guidance it learned)."""
    if not 0 <= seed <= MAX_SEED:
        raise InputError(
            f"--seed is {seed}, expected an integer from 0 to 2**64 - 1: every edit is seeded, so pick one (e.g. "
            f"--seed {DEFAULT_SEED}; -1 is not a random seed here)"
        )
    if not 0 <= guidance < float("inf"):  # also false for NaN
        raise InputError(
            f"--guidance is {guidance}, expected a number >= 0 (FLUX.1-Kontext was distilled for about 1 to 4): "
            f"pass e.g. --guidance {DEFAULT_GUIDANCE}"
        )


def check_gpus_option(gpus: int, engines: bool) -> None:
    """``--gpus``: an integer >= 1, and 1 with engines (an engine runs its whole sequence on one GPU)."""
    if gpus < 1:
        raise InputError(f"--gpus is {gpus}, expected an integer >= 1 (the GPUs of this host to split the edit over)")
    if gpus > 1 and engines:
        raise InputError(
            f"--gpus {gpus} with --engines: an engine runs the whole sequence on one GPU; use --gpus 1 with engines, "
            "or --model for the PyTorch pipeline split over GPUs"
        )


def parse_fbc_threshold(text: str | None, option: str) -> float | None:
    """A first-block-cache threshold as given on the command line: ``off`` (None), or a number >= 0; None (not
    given) is ``DEFAULT_FBC_THRESHOLD``.

    Raises:
        InputError: neither off nor a number >= 0.
    """
    if text is None:
        return DEFAULT_FBC_THRESHOLD
    if text.strip().lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise InputError(f"{option} is '{text}', expected off or a threshold >= 0 such as {DEFAULT_FBC_THRESHOLD}")
    return value


def check_vae_option(vae: str | None) -> None:
    """Raise InputError unless ``vae`` is None, ``tiny`` or an existing directory (its contents are checked when it
    is loaded)."""
    if vae is not None and vae != "tiny" and not Path(vae).expanduser().is_dir():
        raise InputError(
            f"--vae '{vae}' is neither tiny nor a directory: pass tiny (random weights, for timing) or a "
            "diffusers-format AutoencoderTiny directory such as a download of madebyollin/taef1"
        )


@dataclass(frozen=True)
class SamplerConfig:
    """How the denoising loop integrates the flow: solver, sigma schedule and step count.

    Args:
        solver: ``euler`` or ``dpmpp-2m``.
        sigmas: ``log-snr`` (uniform in log-SNR, sigma 1, 0.99 -> 0.02, 0), ``flux-shift`` (FLUX's
            resolution-shifted schedule) or ``karras``; ``None`` takes the solver's default (log-snr for DPM-Solver++
            2M, flux-shift for Euler).
        steps: model calls per edit; ``None`` takes the solver's default (28 Euler, 14 DPM-Solver++ 2M).
    """

    solver: str = "dpmpp-2m"
    sigmas: str | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        _one_of("--scheduler", self.solver, SOLVERS)
        if self.sigmas is None:
            object.__setattr__(self, "sigmas", DEFAULT_SIGMAS[self.solver])
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
        engines: an engines directory from ``fluxtrt build`` (instead of ``model``).
        prompt: the edit instruction.
        out: the image to write (atomically), in the format its extension names (``OUTPUT_FORMATS``).
        sampler: solver, sigma schedule and steps.
        seed: seed of the initial noise.
        guidance: distilled-guidance scale fed to the transformer.
        height, width: target size; both or neither. ``None`` keeps the reference's preferred Kontext resolution.
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA where PyTorch sees a GPU, else the CPU).
        dtype: ``fp32``, ``bf16`` or ``auto`` (bf16 on CUDA, fp32 on CPU).
        gpus: processes the transformer's sequence is split over (one per GPU of this host; with ``device="cpu"``
            CPU processes). 1 runs in this process; more are launched under torchrun (``fluxtrt.parallel``).
        fbc: engines built with ``--first-block-cache``: the cache's threshold as given (``off`` or a number);
            None takes ``DEFAULT_FBC_THRESHOLD``. Given explicitly, the engines must hold the transformer's parts.
        vae: the slim autoencoder in place of the model's VAE: ``tiny`` (random weights) or an AutoencoderTiny
            directory (e.g. a download of madebyollin/taef1); None keeps the model's own.
        low_vram: the 24 GB mode (DESIGN 13): FP8 transformer linears quantized block by block on the way to the
            GPU, text encoders kept on the host and streamed through the GPU, VAE tiled above its tile size.
        loras: ``FILE[:SCALE]`` LoRAs merged into the transformer's weights (``fluxtrt.lora``), in order.
    """

    model: str | None
    image: Path
    prompt: str
    out: Path
    sampler: SamplerConfig = SamplerConfig()
    engines: Path | None = None
    seed: int = DEFAULT_SEED
    guidance: float = DEFAULT_GUIDANCE
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    gpus: int = 1
    fbc: str | None = None
    vae: str | None = None
    low_vram: bool = False
    loras: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_gpus_option(self.gpus, engines=self.engines is not None)
        if self.loras and self.low_vram:
            raise InputError("--lora with --low-vram: the 24 GB mode quantizes the weights as it loads them; leave "
                             "out --low-vram, or run the LoRA on engines")  # fmt: skip
        check_seed_and_guidance(self.seed, self.guidance)
        if (self.model is None) == (self.engines is None):
            model = "not given" if self.model is None else f"'{self.model}'"
            engines = "not given" if self.engines is None else f"'{self.engines}'"
            raise InputError(
                f"--model is {model} and --engines is {engines}: give exactly one (a model to run on PyTorch, or an "
                "engines directory from `fluxtrt build`)"
            )
        _one_of("--device", self.device, ("auto", *DEVICES))
        _one_of("--dtype", self.dtype, DTYPES)
        parse_fbc_threshold(self.fbc, "--fbc")
        if self.fbc is not None and self.engines is None:
            raise InputError(
                f"--fbc is '{self.fbc}' but no --engines is given: the threshold is for engines built with "
                "--first-block-cache (PyTorch runs the cache as stages 1-4 of `fluxtrt compare`)"
            )
        if self.engines is not None and (self.vae is not None or self.low_vram):
            flag = "--vae" if self.vae is not None else "--low-vram"
            raise InputError(
                f"{flag} applies to --model, not to --engines '{self.engines}' (engines hold their own VAE and "
                "placement): build engines with `fluxtrt build --vae ...`, or run --model"
            )
        check_vae_option(self.vae)
        if self.low_vram and self.gpus > 1:
            raise InputError(
                f"--low-vram with --gpus {self.gpus}: the 24 GB mode places one model on one GPU; use one of them"
            )
        for name, value in (("--height", self.height), ("--width", self.width)):
            if value is not None and value <= 0:
                raise InputError(f"{name} is {value}, expected a positive number of pixels (e.g. 1024)")
        if (self.height is None) != (self.width is None):
            given, missing = ("--height", "--width") if self.width is None else ("--width", "--height")
            raise InputError(
                f"{given} {self.height if self.width is None else self.width} was given without {missing}: give "
                "both, or neither to keep the reference image's aspect ratio"
            )
        if not self.image.is_file():
            raise InputError(f"--image '{self.image}' does not exist or is not a file: pass a PNG or JPEG path")
        if self.out.exists() and self.out.is_dir():
            raise InputError(f"--out '{self.out}' is a directory, expected a file path such as {self.out}/edit.png")
        if self.out.suffix.lower() not in OUTPUT_FORMATS:
            what = f"the extension '{self.out.suffix}'" if self.out.suffix else "no extension"
            raise InputError(
                f"--out '{self.out}' has {what}, expected one of "
                f"{', '.join(OUTPUT_FORMATS)}: name the file e.g. {self.out.with_suffix('.png').name}"
            )
        check_writable(self.out, "--out")

    @property
    def fbc_threshold(self) -> float | None:
        """The first-block-cache threshold for the engines (None: off)."""
        return parse_fbc_threshold(self.fbc, "--fbc")

    @property
    def out_format(self) -> str:
        """The image format ``out`` is written in: PNG, JPEG or WEBP, by its extension."""
        return OUTPUT_FORMATS[self.out.suffix.lower()]

    @property
    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if self.resolved_device == "cuda" else "fp32"

    @property
    def resolved_device(self) -> str:
        """``device`` with ``auto`` decided: cuda where PyTorch sees a GPU (imports torch)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


PRECISIONS = ("fp32", "bf16", "fp8", "fp4")
# Compute dtype of the exported graphs and of the model an engine is compared with; fp8/fp4 quantise a bf16 graph.
COMPUTE_DTYPE = {"fp32": "fp32", "bf16": "bf16", "fp8": "bf16", "fp4": "bf16"}
QUANTIZED_PRECISIONS = ("fp8", "fp4")


@dataclass(frozen=True)
class BuildConfig:
    """``fluxtrt build``: which model, backend, precision, shape range and components.

    Args:
        model: ``tiny``, ``random-full`` or a checkpoint directory / cached hub id.
        backend: ``onnxruntime``, ``aotinductor``, ``tensorrt``, ``tensorrt-rtx`` or ``onnx`` (ONNX only).
        precision: ``fp32``, ``bf16``, ``fp8`` or ``fp4``.
        out: the engines directory.
        min_resolution, opt_resolution, max_resolution: the range the engines accept (each side of the target
            and of the reference within min..max) and the size they are tuned for.
        max_batch: largest batch the engines accept.
        components: which components to build (default all five); ``transformer_first`` and ``transformer_rest``
            are the transformer's two parts for the first-block cache.
        first_block_cache: build the transformer as its two parts (``transformer_first``, ``transformer_rest``)
            instead of one engine, so ``infer``/``compare`` can skip the remaining blocks (DESIGN 6).
        force: rebuild even where the recorded settings match.
        device: where the model is loaded for export (``cuda`` for bf16 at full size).
        onnx_dir: use ``<onnx_dir>/<component>/model.onnx`` (exported elsewhere, same input/output names) instead
            of exporting.
        calibration_edits: fp8/fp4: calibration edits run when no saved calibration fits.
        calibration: fp8/fp4: a calibration file (from an earlier build's ``calibration/``) to use instead.
        options: the backend's options given (by field name of its options class, e.g. ``{"weights": "external"}``
            for ``--aoti-weights external``; each backend declares its own, with flag, default and validation). The
            backend turns them into its typed options and refuses one it does not have.
        vae: the slim autoencoder built in place of the model's VAE: ``tiny`` or an AutoencoderTiny directory.
        jobs: components built at once, each in a worker process of its own that loads only the parts of the model
            it builds (``fluxtrt.engines.jobs``); 1 builds them one after another in this process; ``auto`` as many
            as the memory free fits (``fluxtrt.engines.fit``).
    """

    model: str
    backend: str
    precision: str
    out: Path
    min_resolution: Resolution = Resolution(512, 512)
    opt_resolution: Resolution = Resolution(1024, 1024)
    max_resolution: Resolution = Resolution(1568, 1568)
    max_batch: int = 1
    components: tuple[str, ...] = COMPONENTS
    force: bool = False
    device: str = "cpu"
    onnx_dir: Path | None = None
    calibration_edits: int = 8
    calibration: Path | None = None
    options: Mapping[str, object] = field(default_factory=dict)
    first_block_cache: bool = False
    vae: str | None = None
    jobs: int | str = "auto"

    def backend_options(self) -> dict[str, object]:
        """The backend options given (None means not given), by option name."""
        return {k: v for k, v in self.options.items() if v is not None}

    def __post_init__(self) -> None:
        _one_of("--precision", self.precision, PRECISIONS)
        _one_of("--device", self.device, DEVICES)
        check_vae_option(self.vae)
        if self.calibration_edits < 1:
            raise InputError(
                f"--calibration-edits is {self.calibration_edits}, expected an integer >= 1: pass e.g. "
                "--calibration-edits 8"
            )
        for c in self.components:
            _one_of("--components", c, BUILDABLE)
        if not self.components:
            raise InputError(f"--components is empty, expected some of {', '.join(COMPONENTS)}")
        if self.first_block_cache:  # the transformer is built as its two parts, in its place
            parts = [p for c in self.components for p in (TRANSFORMER_PARTS if c == "transformer" else (c,))]
            object.__setattr__(self, "components", tuple(dict.fromkeys(parts)))
        if self.max_batch < 1:
            raise InputError(f"--max-batch is {self.max_batch}, expected an integer >= 1")
        if isinstance(self.jobs, str) and self.jobs != "auto":  # --jobs N as the command line gives it
            with contextlib.suppress(ValueError):
                object.__setattr__(self, "jobs", int(self.jobs))
        if self.jobs != "auto" and (isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1):
            raise InputError(
                f"--jobs is {self.jobs!r}, expected auto or an integer >= 1 (components built at once): pass --jobs "
                "auto to fit the memory free, --jobs 1 to build them one after another, or e.g. --jobs 2"
            )
        lo, opt, hi = self.min_resolution, self.opt_resolution, self.max_resolution
        if not (lo.width <= opt.width <= hi.width and lo.height <= opt.height <= hi.height):
            raise InputError(
                f"resolutions {lo} (min), {opt} (opt), {hi} (max) are not ordered: each side must satisfy "
                "min <= opt <= max (--min-resolution, --opt-resolution, --max-resolution)"
            )
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"--out '{self.out}' is a file, expected a directory for the engines")
        if self.onnx_dir is not None and not self.onnx_dir.is_dir():
            raise InputError(
                f"--onnx-dir '{self.onnx_dir}' is not a directory, expected one with <component>/model.onnx inside"
            )
