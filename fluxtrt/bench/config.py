"""``fluxtrt compare``'s frozen configuration; torch-free, so the CLI validates it before loading anything."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fluxtrt.config import (
    DEFAULT_GUIDANCE,
    DEFAULT_SEED,
    DEVICES,
    DTYPES,
    check_gpus_option,
    check_seed_and_guidance,
    check_vae_option,
    parse_fbc_threshold,
)
from fluxtrt.errors import InputError
from fluxtrt.lora.files import LoraSpec
from fluxtrt.specs.flux import Resolution
from fluxtrt.stages.config import stage_config

DEFAULT_STAGES = ("0", "1", "2", "3", "4", "4f", "4k")
DEFAULT_PROMPT = "make the house blue"
DEFAULT_WARMUP = 2


@dataclass(frozen=True)
class CompareConfig:
    """Every contender on the same inputs, one at a time.

    Args:
        model: ``tiny``, ``random-full`` or a FLUX.1-Kontext directory / cached hub id (for the PyTorch stages).
        stages: stage specs (``"0"``, ``"1:fbc=off"``, ...; see ``fluxtrt.stages.stage_config``), in run order.
        engines: engines directories from ``fluxtrt build``, run after the stages.
        engines_fbc: the first-block cache's threshold (``off`` or a number; None: the stages' default) for the
            engines directories built with ``--first-block-cache``; the others run their one transformer engine.
        report_dir: where report.md, report.json and report.png are written (after every contender).
        image: reference image; None makes a synthetic one of ``resolution`` (1024x1024 by default).
        prompt: the edit instruction.
        resolution: target size; None keeps the reference's preferred Kontext resolution. Used exactly (no fitting
            to 1 MP), floored to the model's multiple of 16.
        runs: timed edits per contender (>= 1; use >= 3 for a median and spread that mean something).
        warmup: untimed edits per contender before the timed ones (compilation happens in the first). Two by
            default: ONNX Runtime's CPU sessions reach their steady speed only at the third call at a shape (the VAE
            of a tiny 1184x880 edit: 3.8 s at the second call, 0.26 s from the third), so one warmup edit left the
            first timed edit cold and made engines look several times slower than they run.
        warmup_steps: denoising steps of a warmup edit; None for the contender's own.
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA where PyTorch sees a GPU, else the CPU), as ``fluxtrt infer``.
        dtype: ``auto`` (bf16 on cuda, fp32 on cpu), ``fp32`` or ``bf16``.
        seed: noise seed, the same for every contender.
        guidance: distilled-guidance scale.
        diffusers_check: after stage 0, time diffusers' own FluxKontextPipeline on the same modules and compare the
            transformer's per-step time with stage 0's.
        prompt_cache: every contender reuses its CLIP and T5 outputs after its first edit (the prompt repeats), so
            the timed edits run no text encoder; off, every edit encodes its prompt.
        gpus: processes each PyTorch stage's transformer is split over (``fluxtrt.parallel``); no engines then.
        vae: the slim autoencoder that stages with ``vae=tiny`` run: None or ``tiny`` for random weights (timing
            only), or an AutoencoderTiny directory (e.g. a download of madebyollin/taef1).
        loras: ``FILE[:SCALE]`` LoRAs every contender edits with: fused into the PyTorch model the stages share
            (before a stage quantizes or compiles it) and merged into each engines directory's transformer, so that
            the fidelity columns compare like with like; the engines' per-step error is against the PyTorch
            transformer with the same LoRAs fused.
    """

    model: str
    stages: tuple[str, ...] = DEFAULT_STAGES
    engines: tuple[Path, ...] = ()
    report_dir: Path | None = None
    image: Path | None = None
    prompt: str = DEFAULT_PROMPT
    resolution: Resolution | None = None
    runs: int = 3
    warmup: int = DEFAULT_WARMUP
    warmup_steps: int | None = 2
    device: str = "auto"
    dtype: str = "auto"
    seed: int = DEFAULT_SEED
    guidance: float = DEFAULT_GUIDANCE
    diffusers_check: bool = False
    prompt_cache: bool = False
    gpus: int = 1
    engines_fbc: str | None = None
    vae: str | None = None
    loras: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_gpus_option(self.gpus, engines=bool(self.engines))
        check_seed_and_guidance(self.seed, self.guidance)
        if self.device not in ("auto", *DEVICES):
            raise InputError(f"--device is '{self.device}', expected one of auto, {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype is '{self.dtype}', expected one of {', '.join(DTYPES)}")
        if self.runs < 1:
            raise InputError(f"--runs is {self.runs}, expected an integer >= 1 (3 or more for a median and spread)")
        if self.warmup < 0:
            raise InputError(f"--warmup is {self.warmup}, expected an integer >= 0")
        if self.warmup_steps is not None and self.warmup_steps < 1:
            raise InputError(f"--warmup-steps is {self.warmup_steps}, expected an integer >= 1")
        parse_fbc_threshold(self.engines_fbc, "--engines-fbc")
        if not self.stages and not self.engines:
            raise InputError("nothing to compare: give --stages (e.g. 0,1,2,3,4,4f,4k) and/or --engines DIR")
        if len(set(self.stages)) != len(self.stages):
            raise InputError(f"--stages {','.join(self.stages)} names a stage twice: give each stage spec once")
        configs = [stage_config(spec) for spec in self.stages]  # raises InputError on an unknown stage or override
        check_vae_option(self.vae)
        if self.vae is not None and not any(c.vae == "tiny" for c in configs):
            raise InputError(
                f"--vae '{self.vae}' is used by stages with vae=tiny and --stages {','.join(self.stages)} has none: "
                "add one such as 4:vae=tiny"
            )
        for text in self.loras:
            LoraSpec.parse(text)  # the file exists and the scale is a number; read before any model is loaded
        low = [c.name for c in configs if c.low_vram]
        if self.loras and low:
            raise InputError(f"--lora with stage {low[0]}: the 24 GB mode quantizes the weights as it loads them; "
                             "leave lowvram=on out of --stages, or compare without --lora")  # fmt: skip
        for path in self.engines:
            if not path.is_dir():
                raise InputError(f"--engines '{path}' is not a directory: pass a directory written by `fluxtrt build`")
        if self.image is not None and not self.image.is_file():
            raise InputError(f"--image '{self.image}' does not exist or is not a file: pass a PNG or JPEG path")
        if self.report_dir is not None and self.report_dir.exists() and not self.report_dir.is_dir():
            raise InputError(f"--report '{self.report_dir}' is a file, expected a directory for the report")

    @property
    def engines_fbc_threshold(self) -> float | None:
        """The engines' first-block-cache threshold (None: off)."""
        return parse_fbc_threshold(self.engines_fbc, "--engines-fbc")

    @property
    def resolved_device(self) -> str:
        """``device`` with ``auto`` decided: cuda where PyTorch sees a GPU (imports torch)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if self.resolved_device == "cuda" else "fp32"

    def to_dict(self) -> dict:
        """JSON-ready: paths and resolutions as strings."""
        return {
            "model": self.model,
            "stages": list(self.stages),
            "engines": [str(p) for p in self.engines],
            "report_dir": str(self.report_dir) if self.report_dir is not None else None,
            "image": str(self.image) if self.image is not None else None,
            "prompt": self.prompt,
            "resolution": str(self.resolution) if self.resolution is not None else None,
            "runs": self.runs,
            "warmup": self.warmup,
            "warmup_steps": self.warmup_steps,
            "device": self.resolved_device,
            "dtype": self.resolved_dtype,
            "seed": self.seed,
            "guidance": self.guidance,
            "diffusers_check": self.diffusers_check,
            "prompt_cache": self.prompt_cache,
            "gpus": self.gpus,
            "engines_fbc": self.engines_fbc_threshold,
            "vae": self.vae,
            "loras": [{"file": str(spec.path), "scale": spec.scale} for spec in map(LoraSpec.parse, self.loras)],
        }
