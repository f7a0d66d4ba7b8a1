"""The PyTorch stages of DESIGN 4 as frozen configurations over one pipeline; torch-free, so the CLI validates early.

A stage is named by the table (``0``, ``1``, ``2``, ``3``, ``4``, ``4f``, ``4k``); a contender spec may override fields
after colons, e.g. ``1:fbc=off`` (stage 1 without the first-block cache), ``3:quant=fp4``, ``4:steps=8:compile=off``,
``4:vae=tiny`` (the slim autoencoder), ``4:lowvram=on`` (the 24 GB mode, DESIGN 13).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fluxtrt.config import DEFAULT_FBC_THRESHOLD, SIGMA_SCHEDULES, SOLVERS, SamplerConfig, parse_fbc_threshold
from fluxtrt.errors import InputError

ATTENTION = ("sdpa", "fp8")
QUANT = (None, "fp8", "fp4")
VAES = ("full", "tiny")

_EULER_28 = SamplerConfig("euler", "flux-shift", 28)


@dataclass(frozen=True)
class StageConfig:
    """What one PyTorch stage turns on, over the same ``KontextPipeline``.

    Args:
        name: the stage or contender spec (``"1"``, ``"1:fbc=off"``).
        compile: regional ``torch.compile`` of the transformer's repeated blocks (diffusers' compile_repeated_blocks).
        compile_backend: the torch.compile backend (``inductor``; ``aot_eager`` traces without code generation).
        fuse_qkv: fused Q/K/V projections (diffusers' fuse_qkv_projections).
        compile_vae: channels-last VAE and a compiled decode.
        first_block_cache: relative-change threshold of the first-block cache, or None for off.
        attention: ``sdpa`` (torch's SDPA, what diffusers runs) or ``fp8`` (FA3 FP8, else cuDNN FP8 SDPA).
        quant: None, ``fp8`` (torchao dynamic per-row FP8 linears) or ``fp4`` (NVFP4, sm100+ only).
        sampler: solver, sigma schedule and steps.
        vae: ``full`` (the model's own VAE) or ``tiny`` (the slim AutoencoderTiny, TAEF1's architecture).
        low_vram: the 24 GB mode: the transformer quantized block by block on the way to the device, text encoders
            kept on the host and streamed through the device, VAE tiled above its tile size (DESIGN 13).
    """

    name: str
    compile: bool = False
    compile_backend: str = "inductor"
    fuse_qkv: bool = False
    compile_vae: bool = False
    first_block_cache: float | None = None
    attention: str = "sdpa"
    quant: str | None = None
    sampler: SamplerConfig = _EULER_28
    vae: str = "full"
    low_vram: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise InputError(f"stage {self.name}: attention is '{self.attention}', expected one of sdpa, fp8")
        if self.quant not in QUANT:
            raise InputError(f"stage {self.name}: quant is '{self.quant}', expected off, fp8 or fp4")
        if self.vae not in VAES:
            raise InputError(f"stage {self.name}: vae is '{self.vae}', expected full or tiny")
        if self.first_block_cache is not None and self.first_block_cache < 0:
            raise InputError(
                f"stage {self.name}: first-block-cache threshold is {self.first_block_cache}, expected >= 0 or off"
            )

    @property
    def base(self) -> str:
        """The table stage this config derives from (``"1"`` for ``"1:fbc=off"``)."""
        return self.name.split(":", 1)[0]

    def features(self) -> tuple[str, ...]:
        """The switched-on features, in the table's order (the sampler is listed apart)."""
        out = []
        if self.compile:
            out.append(f"regional compile ({self.compile_backend})")
        if self.fuse_qkv:
            out.append("fused QKV")
        if self.compile_vae:
            out.append("channels-last VAE, compiled decode")
        if self.first_block_cache is not None:
            out.append(f"first-block cache {self.first_block_cache:g}")
        if self.attention == "fp8":
            out.append("FP8 attention")
        if self.quant is not None:
            out.append(f"{self.quant.upper()} linears")
        if self.vae == "tiny":
            out.append("slim VAE (AutoencoderTiny)")
        if self.low_vram:
            out.append("low-VRAM placement")
        return tuple(out)

    def includes(self, other: StageConfig) -> bool:
        """Whether every feature of ``other`` is on here too (the sampler aside)."""
        return (
            (self.compile or not other.compile)
            and (self.fuse_qkv or not other.fuse_qkv)
            and (self.compile_vae or not other.compile_vae)
            and (self.first_block_cache is not None or other.first_block_cache is None)
            and (self.attention == "fp8" or other.attention == "sdpa")
            and (self.quant is not None or other.quant is None)
        )


def _stage_table() -> dict[str, StageConfig]:
    s0 = StageConfig("0")
    s1 = replace(s0, name="1", compile=True, fuse_qkv=True, compile_vae=True, first_block_cache=DEFAULT_FBC_THRESHOLD)
    s2 = replace(s1, name="2", attention="fp8")
    s3 = replace(s2, name="3", quant="fp8")
    s4 = replace(s3, name="4", sampler=SamplerConfig("dpmpp-2m", "log-snr", 14))
    s4f = replace(s4, name="4f", sampler=SamplerConfig("dpmpp-2m", "flux-shift", 14))  # stage 4 before log-snr
    s4k = replace(s4, name="4k", sampler=SamplerConfig("dpmpp-2m", "karras", 14))
    return {s.name: s for s in (s0, s1, s2, s3, s4, s4f, s4k)}


# DESIGN 4: each stage adds to the previous one.
STAGES: dict[str, StageConfig] = _stage_table()

_OVERRIDES = ("fbc", "steps", "compile", "fuse", "vae", "attention", "quant", "solver", "sigmas", "lowvram")


def _switch(key: str, value: str, spec: str) -> bool:
    if value in ("on", "true", "1"):
        return True
    if value in ("off", "false", "0"):
        return False
    raise InputError(f"stage spec '{spec}': {key}={value}, expected on or off")


def stage_config(spec: str) -> StageConfig:
    """The ``StageConfig`` for a stage spec: a table stage, optionally with ``:key=value`` overrides.

    Keys: ``fbc`` (off or a threshold), ``steps``, ``compile`` (on; off, which also leaves the VAE decode eager; or
    the torch.compile backend of whatever the stage compiles), ``fuse`` (on/off), ``vae`` (on/off: the
    channels-last, compiled decode; tiny/full: which autoencoder), ``attention`` (sdpa, fp8), ``quant`` (off, fp8,
    fp4), ``solver``, ``sigmas``, ``lowvram`` (on/off).

    Raises:
        InputError: unknown stage, key or value.
    """
    base, *overrides = spec.strip().split(":")
    if base not in STAGES:
        raise InputError(f"stage '{base}' (in '{spec}') is not a stage, expected one of {', '.join(STAGES)}")
    cfg = replace(STAGES[base], name=spec.strip())
    sampler = cfg.sampler
    for item in overrides:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip().lower()
        if not sep or key not in _OVERRIDES:
            raise InputError(
                f"stage spec '{spec}': '{item}' is not an override, expected key=value with key one of "
                f"{', '.join(_OVERRIDES)} (e.g. 1:fbc=off)"
            )
        if key == "fbc":
            cfg = replace(cfg, first_block_cache=parse_fbc_threshold(value, f"stage spec '{spec}': fbc"))
        elif key == "steps":
            if not value.isdigit() or int(value) < 1:
                raise InputError(f"stage spec '{spec}': steps={value}, expected an integer >= 1")
            sampler = replace(sampler, steps=int(value))
        elif key == "compile":
            if value in ("on", "off", "true", "false", "1", "0"):
                on = _switch(key, value, spec)
                cfg = replace(cfg, compile=on, compile_vae=cfg.compile_vae and on)
            else:
                cfg = replace(cfg, compile=True, compile_backend=value)
        elif key == "fuse":
            cfg = replace(cfg, fuse_qkv=_switch(key, value, spec))
        elif key == "vae" and value in VAES:
            cfg = replace(cfg, vae=value)
        elif key == "vae":
            if value not in ("on", "off", "true", "false", "1", "0"):
                raise InputError(f"stage spec '{spec}': vae={value}, expected on/off (compiled decode), tiny or full")
            cfg = replace(cfg, compile_vae=_switch(key, value, spec))
        elif key == "lowvram":
            cfg = replace(cfg, low_vram=_switch(key, value, spec))
        elif key == "attention":
            cfg = replace(cfg, attention=value)
        elif key == "quant":
            cfg = replace(cfg, quant=None if value == "off" else value)
        elif key == "solver":
            if value not in SOLVERS:
                raise InputError(f"stage spec '{spec}': solver={value}, expected one of {', '.join(SOLVERS)}")
            sampler = replace(sampler, solver=value)
        elif key == "sigmas":
            if value not in SIGMA_SCHEDULES:
                raise InputError(f"stage spec '{spec}': sigmas={value}, expected one of {', '.join(SIGMA_SCHEDULES)}")
            sampler = replace(sampler, sigmas=value)
    return replace(cfg, sampler=sampler)


# Why each stage feature is off with --gpus N (the report and docs say the same).
FBC_OFF = (
    "first-block cache: off with --gpus (its runner calls the blocks itself, past the model forward where the "
    "sequence is split, and every process would have to take the same skip decision)"
)
LOW_VRAM_OFF = (
    "24 GB mode: off with --gpus (it places one model on one GPU block by block; each process loads its own copy)"
)
FP8_ATTENTION_OFF = (
    "FP8 attention: off with --gpus (its kernel runs outside diffusers' attention dispatcher, where Ulysses "
    "exchanges Q/K/V between the GPUs); BF16 SDPA instead"
)


def restrict_stage(config: StageConfig) -> tuple[StageConfig, list[str]]:
    """``config`` without what cannot run context-parallel, and one line per feature switched off."""
    notes = []
    if config.first_block_cache is not None:
        config = replace(config, first_block_cache=None)
        notes.append(FBC_OFF)
    if config.attention == "fp8":
        config = replace(config, attention="sdpa")
        notes.append(FP8_ATTENTION_OFF)
    if config.low_vram:
        config = replace(config, low_vram=False)
        notes.append(LOW_VRAM_OFF)
    return config, notes
