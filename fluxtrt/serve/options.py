"""What a server (``fluxtrt serve``) or a batch of edits (``fluxtrt infer --edits``) runs, and the limits a request is
held to. Torch-free: validated before anything heavy is loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fluxtrt.config import (
    DEVICES,
    DTYPES,
    InferConfig,
    SamplerConfig,
    check_gpus_option,
    check_vae_option,
    parse_fbc_threshold,
)
from fluxtrt.errors import InputError
from fluxtrt.specs.flux import Resolution

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_UPLOAD_MB = 20.0
# 4096 x 4096: far above the ~1 MP an edit works at, far below what decoding could exhaust memory with.
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_STEPS = 100
DEFAULT_WARMUP_STEPS = 2
# Seconds a client is told to wait (Retry-After) when the queue is full or the model is still loading.
RETRY_AFTER_S = 5


@dataclass(frozen=True)
class ServedSource:
    """The pipeline to load: a model on PyTorch or an engines directory, with infer's loading options.

    The attribute names are those of ``fluxtrt.config.InferConfig`` that ``fluxtrt.infer`` loads a pipeline from.
    """

    model: str | None = None
    engines: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    fbc: str | None = None
    vae: str | None = None
    low_vram: bool = False

    def __post_init__(self) -> None:
        if (self.model is None) == (self.engines is None):
            given = "both" if self.model is not None else "neither"
            raise InputError(f"--model and --engines: {given} given; give exactly one")
        if self.device not in ("auto", *DEVICES):
            raise InputError(f"--device is '{self.device}', expected one of auto, {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype is '{self.dtype}', expected one of {', '.join(DTYPES)}")
        check_gpus_option(1, engines=self.engines is not None)
        parse_fbc_threshold(self.fbc, "--fbc")
        if self.fbc is not None and self.engines is None:
            raise InputError(f"--fbc is '{self.fbc}' but no --engines is given: the threshold is for engines")
        if self.engines is not None and (self.vae is not None or self.low_vram):
            flag = "--vae" if self.vae is not None else "--low-vram"
            raise InputError(f"{flag} applies to --model, not to --engines '{self.engines}': engines hold their own")
        if self.engines is not None and not (Path(self.engines) / "manifest.json").is_file():
            raise InputError(f"--engines '{self.engines}' has no manifest.json: pass a directory from `fluxtrt build`")
        check_vae_option(self.vae)

    @property
    def fbc_threshold(self) -> float | None:
        return parse_fbc_threshold(self.fbc, "--fbc")

    # auto decided as `fluxtrt infer` decides it: cuda where PyTorch sees a GPU; bf16 on cuda, fp32 on the CPU.
    resolved_device = InferConfig.resolved_device
    resolved_dtype = InferConfig.resolved_dtype

    @property
    def label(self) -> str:
        return f"engines {self.engines}" if self.engines is not None else f"model {self.model}"


def check_loras_source(source: ServedSource) -> None:
    """Raise where ``source`` cannot take ``--lora`` (the 24 GB mode quantizes the weights while loading them)."""
    if source.low_vram:
        raise InputError("--lora with --low-vram: the 24 GB mode quantizes the weights as it loads them; leave out "
                         "--low-vram, or serve the LoRA on engines")  # fmt: skip


@dataclass(frozen=True)
class ServeConfig:
    """A server: what it runs, where it listens, and the limits every request is checked against before it is
    queued.

    Args:
        source: the pipeline to load.
        sampler: solver and sigma schedule of every edit; its steps are the default of a request that gives none.
        host, port: where to listen (loopback by default; another host is reachable from the network).
        max_queue: requests waiting for the worker beyond which a request gets 503 with Retry-After.
        max_batch: images one engine call makes (a request's ``n`` and batched requests together); None: the
            engines' built batch, 1 for a model.
        api_key_env: an environment variable holding the key that every route but /health and the static page
            needs as ``Authorization: Bearer KEY``; None: no key.
        max_upload_mb: request bodies above this get 413.
        max_pixels: uploaded images with more pixels are refused from their header, before being decoded.
        max_steps: the most denoising steps a request may ask for.
        keep_reference_size: use an uploaded image at its own size (floored to a multiple of 16) as the reference,
            instead of its closest ~1 MP Kontext resolution (diffusers' ``_auto_resize=False``); it is scaled down
            to the largest Kontext area when above it.
        warmup_size: the size of the warm-up edits run before the server reports ready; None: the engines' opt
            resolution, 1024x1024 for a model.
        warmup_steps: denoising steps of each warm-up edit (0: no warm-up).
        loras: ``[NAME=]FILE[:SCALE]`` LoRAs read at start, which a request picks by name (form field ``lora``) and
            strength (``lora_scale``, default SCALE, else 1); NAME defaults to the file's stem.
    """

    source: ServedSource
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_queue: int = DEFAULT_MAX_QUEUE
    max_batch: int | None = None
    api_key_env: str | None = None
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_steps: int = DEFAULT_MAX_STEPS
    keep_reference_size: bool = False
    warmup_size: Resolution | None = None
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    loras: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port is {self.port}, expected 0-65535 (0 picks a free port)")
        for name, value, least in (("--max-queue", self.max_queue, 1), ("--max-batch", self.max_batch, 1),
                                   ("--max-pixels", self.max_pixels, 64 * 64), ("--max-steps", self.max_steps, 1),
                                   ("--warmup-steps", self.warmup_steps, 0)):  # fmt: skip
            if value is not None and value < least:
                raise InputError(f"{name} is {value}, expected an integer >= {least}")
        if not self.max_upload_mb > 0:
            raise InputError(f"--max-upload-mb is {self.max_upload_mb}, expected a positive number of megabytes")
        if self.api_key_env is not None:
            self.api_key()  # fails now, not at the first request
        if self.loras:
            from fluxtrt.serve.loras import check_served

            check_loras_source(self.source)
            check_served(self.loras)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def exposed(self) -> bool:
        """True when the server listens beyond this machine."""
        return self.host not in LOOPBACK_HOSTS

    def api_key(self) -> str | None:
        """The key requests must bear, read from ``api_key_env``; None when no key is asked for.

        Raises:
            InputError: the variable is unset or empty.
        """
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key.strip():
            raise InputError(
                f"--api-key-env names {self.api_key_env}, which is unset or empty: export {self.api_key_env}=<a long "
                "random key> first"
            )
        return key.strip()
