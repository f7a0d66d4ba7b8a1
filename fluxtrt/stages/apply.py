"""Apply a stage to loaded components: the same modules, wrapped and switched as the stage says, as torch runners.

Stages compose (DESIGN 4: each adds to the previous one), and so does applying them: ``StagedModel`` remembers what
it has done to its components so that stage 2 after stage 1 only swaps the attention processor and stage 4 after
stage 3 only changes the sampler, each compile happening once. What cannot be undone through a public API (regional
compilation, quantized weights) makes ``can_apply`` say why, and the caller loads the model again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fluxtrt.backends.runner import DelegatingRunner, Runner
from fluxtrt.backends.torch_runner import TorchRunner
from fluxtrt.errors import FluxtrtError, InputError
from fluxtrt.models.options import LoadedModel
from fluxtrt.pipeline.model import model_runners
from fluxtrt.stages.cache import CacheStats, FirstBlockCacheRunner
from fluxtrt.stages.config import StageConfig
from fluxtrt.timing import sync


@dataclass
class StageReport:
    """What a stage actually ran; the measured fields fill in as edits run.

    Attributes:
        stage: the stage spec.
        features: the features that are on, as applied (a requested feature that could not be is not here).
        unavailable: requested features that could not be applied here, each with the reason.
        sampler: ``solver/sigmas/steps``.
        attention: the attention kernel that runs.
        quant: the linears' precision path.
        compile: what is compiled, or ``off``.
        apply_s: seconds spent applying (fusing, quantizing, swapping processors); compilation is lazy and apart.
        compile_s: seconds of compilation: each compiled component's first call minus its steady per-call time.
        first_call_ms: each compiled component's first-call milliseconds (includes compilation).
        first_block_cache: the threshold, or None.
        cache: computed/skipped steps and their costs, of the last edit.
        low_vram: loaded for the 24 GB mode (DESIGN 13).
    """

    stage: str
    features: list[str]
    unavailable: list[str]
    sampler: str
    attention: str
    quant: str
    compile: str
    apply_s: float
    compile_s: float | None = None
    first_call_ms: dict[str, float] = field(default_factory=dict)
    first_block_cache: float | None = None
    cache: CacheStats | None = None
    low_vram: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.cache is not None:
            out["cache"] = {
                "computed": self.cache.computed,
                "skipped": self.cache.skipped,
                "mean_computed_ms": self.cache.mean_computed_ms,
                "mean_skipped_ms": self.cache.mean_skipped_ms,
            }
        return out


class FirstCallTimer(DelegatingRunner):
    """A runner in front of another that times its first call (where compilation happens) with device
    synchronisation. Only that call synchronises; the steady-state cost it is compared with comes from the pipeline's
    own timer."""

    def __init__(self, inner: Runner):
        super().__init__(inner)
        self.first_ms: float | None = None

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        if self.first_ms is not None:
            return self.inner.infer(feed)
        sync()
        t0 = time.perf_counter()
        out = self.inner.infer(feed)
        sync()
        self.first_ms = (time.perf_counter() - t0) * 1e3
        return out


class ChannelsLastDecoder(torch.nn.Module):
    """VAE decode on a channels-last latent, the decoder's weights channels-last too. [B, 16, h, w] -> [B, 3, H, W]."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent.contiguous(memory_format=torch.channels_last), return_dict=False)[0]


@dataclass
class AppliedStage:
    """A stage applied to loaded components: its runners (for ``KontextPipeline``) and its report.

    Call ``begin_edit()`` before and ``end_edit()`` after each edit to reset the first-block cache and collect its
    counts and the compile time into the report.
    """

    config: StageConfig
    runners: dict[str, Runner]
    report: StageReport
    cache_runner: FirstBlockCacheRunner | None = None
    timers: dict[str, FirstCallTimer] = field(default_factory=dict)

    def begin_edit(self) -> None:
        if self.cache_runner is not None:
            self.cache_runner.reset()

    def end_edit(
        self, timings_ms: Mapping[str, float] | None = None, calls: Mapping[str, int] | None = None
    ) -> CacheStats | None:
        """Update the report after an edit; returns this edit's first-block-cache stats (None without the cache).

        Args:
            timings_ms, calls: the edit's per-component milliseconds and call counts (``EditResult.timings_ms`` and
                ``.calls``) of a steady-state edit: compile time = each compiled component's first call minus its
                steady per-call time here. Leave them out for a warmup edit.
        """
        stats = self.cache_runner.stats() if self.cache_runner is not None else None
        self.report.first_call_ms = {n: t.first_ms for n, t in self.timers.items() if t.first_ms is not None}
        first = self.report.first_call_ms
        known = timings_ms is not None and calls is not None and len(first) == len(self.timers) > 0
        if known and all(n in timings_ms and calls.get(n) for n in self.timers):
            steady = {n: timings_ms[n] / calls[n] for n in self.timers}
            if "transformer" in steady and stats is not None and stats.mean_computed_ms is not None:
                steady["transformer"] = stats.mean_computed_ms  # a first call computes every block
            self.report.compile_s = sum(max(first[n] - steady[n], 0.0) for n in steady) / 1e3
        if stats is not None:
            self.report.cache = stats
        return stats


def _raise_recompile_limits() -> None:
    """Regional compilation shares one code object among every compiled block class and stage; the default limit
    of 8 recompilations would silently fall back to eager. Raise it, and fail loudly if it is ever hit."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 512)
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        dynamo_config.fail_on_recompile_limit_hit = True


def _sampler_text(config: StageConfig) -> str:
    s = config.sampler
    return f"{s.solver}/{s.sigmas}/{s.num_steps}"


class StagedModel:
    """Loaded components plus what has been applied to them, so that stages can be applied one after another.

    Args:
        components: loaded ``FluxKontextComponents`` (modified in place by ``apply``).
        tiny_vae: the slim autoencoder that stages with ``vae=tiny`` use: ``tiny`` (random weights) or an
            AutoencoderTiny directory; loaded on first use.
        seed: initialisation seed of a random slim autoencoder.

    A model loaded for the 24 GB mode (``from_model``) sets ``low_vram`` and ``offloads`` (the text encoders'
    ``HostOffload``) and comes fused and quantized as its stage asked.
    """

    def __init__(self, components: Any, tiny_vae: str = "tiny", seed: int = 0):
        self.components = components
        self.device = torch.device(components.transformer.device)
        self.fused = False
        self.compiled_backend: str | None = None
        self.quant: str | None = None
        self.quant_path: str | None = None
        self.low_vram = False
        self.offloads: dict[str, Any] = {}  # component -> HostOffload, in the 24 GB mode
        self.vaes = {"full": components.vae}
        self.tiny_vae_source, self.seed = tiny_vae, seed
        self._decoders: dict[tuple[str, str], torch.nn.Module] = {}

    @classmethod
    def from_model(cls, model: LoadedModel, tiny_vae: str = "tiny") -> StagedModel:
        """The components of a model loaded by ``fluxtrt.models.options.load_model``, with what its loading did:
        the 24 GB mode's placement and offloads, its fused QKV and quantized linears."""
        staged = cls(model.components, tiny_vae=tiny_vae, seed=model.options.seed)
        staged.low_vram = model.options.low_vram
        staged.offloads = dict(model.offloads)
        staged.fused = model.fused
        staged.quant, staged.quant_path = model.quant, model.quant_path
        return staged

    def can_apply(self, config: StageConfig) -> str | None:
        """None if ``config`` can be applied to these components, else why the model must be loaded again."""
        if config.low_vram != self.low_vram:
            return f"the model was loaded {'for' if self.low_vram else 'without'} low-VRAM placement"
        if self.low_vram and config.fuse_qkv != self.fused:
            return f"the low-VRAM model was placed {'with' if self.fused else 'without'} fused QKV"
        backend = self.compiled_backend
        if backend is not None and (not config.compile or config.compile_backend != backend):
            wants = config.compile_backend if config.compile else "them eager"
            return f"the transformer blocks are compiled with {backend} and stage {config.name} wants {wants}"
        if self.quant is not None and config.quant != self.quant:
            return f"the linears are {self.quant} and stage {config.name} wants {config.quant or 'them unquantized'}"
        if self.quant is not None and config.fuse_qkv != self.fused:
            return f"the linears were quantized {'with' if self.fused else 'without'} fused QKV"
        return None

    def apply(self, config: StageConfig, strict: bool = False) -> AppliedStage:
        """Switch the components to ``config`` and return its runners and report.

        Args:
            config: the stage.
            strict: raise when a requested feature is unavailable here (no CUDA, no package, wrong GPU) instead of
                leaving it off and naming it in ``report.unavailable``.

        Raises:
            InputError: ``can_apply`` refused (load the model again).
            DeviceError, MissingDependencyError: with ``strict``, a feature unavailable here; fp4 on a GPU without
                FP4 tensor cores always.
        """
        reason = self.can_apply(config)
        if reason is not None:
            raise InputError(f"stage {config.name} cannot be applied to this model: {reason}; load the model again")
        t0 = time.perf_counter()
        unavailable: list[str] = []

        def unavailable_or_raise(feature: str, exc: FluxtrtError) -> None:
            if strict:
                raise exc
            unavailable.append(f"{feature}: {exc}")

        self._set_vae(config.vae)
        quant = self._set_linears(config, unavailable_or_raise)
        attention, fp8_attention = self._set_attention(config, unavailable_or_raise)
        # Compilation is lazy: it happens on the first call, which FirstCallTimer measures.
        if config.compile and self.compiled_backend is None:
            _raise_recompile_limits()
            self.components.transformer.compile_repeated_blocks(fullgraph=True, backend=config.compile_backend)
            self.compiled_backend = config.compile_backend
        runners, cache_runner, timers = self._runners(config)
        report = StageReport(
            stage=config.name,
            features=self._features(config, fp8_attention),
            unavailable=unavailable,
            sampler=_sampler_text(config),
            attention=attention,
            quant=quant,
            compile=", ".join(self._compiled(config)) or "off",
            apply_s=time.perf_counter() - t0,
            first_block_cache=config.first_block_cache,
            low_vram=self.low_vram,
        )
        return AppliedStage(config, runners, report, cache_runner, timers)

    def _set_vae(self, which: str) -> None:
        """Put the full or the slim autoencoder in the components (reversible); the slim one loads on first use.
        The pipeline reads its scaling and shift from the one in place (the slim one's are 1 and 0)."""
        if which not in self.vaes:
            from fluxtrt.models.tiny_vae import load_tiny_vae

            full = self.vaes["full"]
            self.vaes[which] = load_tiny_vae(self.tiny_vae_source, self.device, full.dtype, self.seed,
                                             full.config.latent_channels)  # fmt: skip
        self.components.vae = self.vaes[which]

    def _set_linears(self, config: StageConfig, unavailable_or_raise) -> str:
        """Fuse or unfuse Q/K/V (reversible, diffusers' own methods) and quantize the linears (irreversible:
        ``can_apply`` guards it); returns the linears' precision path."""
        transformer = self.components.transformer
        if config.fuse_qkv and not self.fused:
            transformer.fuse_qkv_projections()
        elif not config.fuse_qkv and self.fused:
            transformer.unfuse_qkv_projections()
        self.fused = config.fuse_qkv
        if config.quant is not None and self.quant is None:
            from fluxtrt.models.torchao_linears import quantize_transformer

            try:
                self.quant_path = quantize_transformer(transformer, config.quant)
                self.quant = config.quant
            except FluxtrtError as exc:
                if config.quant == "fp4":  # asked for explicitly, never silently replaced
                    raise
                unavailable_or_raise(f"{config.quant.upper()} linears", exc)
        dtype_name = str(transformer.dtype).removeprefix("torch.")
        return self.quant_path if self.quant is not None else f"{dtype_name} (not quantized)"

    def _runners(self, config: StageConfig) -> tuple[dict[str, Runner], FirstBlockCacheRunner | None, dict]:
        """The stage's runners: torch runners, the first-block cache in front of the transformer, a compiled
        channels-last VAE decode, and first-call timers on what is compiled."""
        runners = model_runners(self.components, self.offloads, tiled_vae=self.low_vram)
        transformer, dtype = self.components.transformer, self.components.transformer.dtype
        cache_runner = None
        if config.first_block_cache is not None:
            cache_runner = FirstBlockCacheRunner(runners["transformer"].spec, transformer, config.first_block_cache,
                                                 dtype)  # fmt: skip
            runners["transformer"] = cache_runner
        vae = self.components.vae
        # Only the decoder goes channels-last: the encoder keeps its layout for its contiguous image input.
        decoder_modules = [m for m in (vae.decoder, getattr(vae, "post_quant_conv", None)) if m is not None]
        layout = torch.channels_last if config.compile_vae else torch.contiguous_format
        for m in decoder_modules:
            m.to(memory_format=layout)
        if config.compile_vae:
            decoder = self._decoders.get((config.compile_backend, config.vae))
            if decoder is None:
                decoder = torch.compile(ChannelsLastDecoder(vae), backend=config.compile_backend)
                self._decoders[(config.compile_backend, config.vae)] = decoder
            runners["vae_decoder"] = TorchRunner(runners["vae_decoder"].spec, decoder, dtype)
        timers = {}
        for name, on in (("transformer", self.compiled_backend is not None), ("vae_decoder", config.compile_vae)):
            if on:
                timers[name] = runners[name] = FirstCallTimer(runners[name])
        return runners, cache_runner, timers

    def _features(self, config: StageConfig, fp8_attention: bool) -> list[str]:
        """What is on, in the table's order, as applied."""
        features = []
        if self.compiled_backend is not None:
            features.append(f"regional compile ({self.compiled_backend})")
        if self.fused:
            features.append("fused QKV")
        if config.compile_vae:
            features.append("channels-last VAE, compiled decode")
        if config.first_block_cache is not None:
            features.append(f"first-block cache {config.first_block_cache:g}")
        if fp8_attention:
            features.append("FP8 attention")
        if self.quant is not None:
            features.append(f"{self.quant.upper()} linears")
        if config.vae == "tiny":
            features.append("slim VAE (AutoencoderTiny)")
        if self.low_vram:
            features.append("low-VRAM placement (text encoders streamed from the host)")
        return features

    def _compiled(self, config: StageConfig) -> list[str]:
        compiled = []
        if self.compiled_backend is not None:
            compiled.append(f"transformer blocks ({self.compiled_backend}, regional)")
        if config.compile_vae:
            compiled.append(f"VAE decode ({config.compile_backend}, channels-last)")
        return compiled

    def _set_attention(self, config: StageConfig, unavailable_or_raise) -> tuple[str, bool]:
        """Set every attention processor for ``config``; returns (kernel name, whether FP8 attention is on)."""
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        transformer = self.components.transformer
        if config.attention == "fp8":
            from fluxtrt.kernels.attention import Fp8FluxAttnProcessor, checked_fp8_attention_kernel

            try:
                kernel = checked_fp8_attention_kernel(self.device)
                transformer.set_attn_processor(Fp8FluxAttnProcessor(kernel))
                return kernel.name, True
            except FluxtrtError as exc:
                unavailable_or_raise("FP8 attention", exc)
        transformer.set_attn_processor(FluxAttnProcessor())
        return f"torch SDPA ({self.device.type}, default backend selection)", False
