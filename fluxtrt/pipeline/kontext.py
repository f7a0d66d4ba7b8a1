"""The Kontext edit over one runner per component. It never knows which backend a runner is."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fluxtrt.backends.runner import Runner
from fluxtrt.config import DEFAULT_GUIDANCE, SamplerConfig
from fluxtrt.errors import FluxtrtError, InputError, ShapeError
from fluxtrt.pipeline.first_block_cache import SplitTransformerRunner
from fluxtrt.pipeline.image import (
    MIN_REFERENCE_SIDE,
    images_to_tensor,
    tensor_to_images,
)
from fluxtrt.pipeline.latents import pack, position_ids, unpack
from fluxtrt.pipeline.sizes import SizeRange, check_sequence, fit_geometry, wanted_geometry
from fluxtrt.pipeline.text import tokenize
from fluxtrt.schedulers import flux_mu, make_solver, sigma_schedule
from fluxtrt.specs.flux import FluxDims, Resolution, dim_values, dims_from_components
from fluxtrt.timing import ComponentTimer

DEFAULT_MAX_AREA = 1024**2
# Prompt lists whose text-encoder outputs a pipeline keeps (CLIP pooled + T5 states: 4 MB a prompt in BF16).
DEFAULT_PROMPT_CACHE = 8


def diffusers_timestep(sigma: float, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """sigma as the transformer's [B] timestep input, rounded the way diffusers' Flux pipelines round it.

    diffusers passes (1000 sigma in fp32, cast to the compute dtype) / 1000; in bf16 that differs from casting sigma
    directly by up to 1%, so taking the same path keeps a bf16 edit on diffusers' trajectory. In fp32 it is sigma.
    """
    t = torch.full((batch,), float(sigma), dtype=torch.float32, device=device) * 1000.0  # fp32, as diffusers
    return t.to(dtype) / 1000.0


@dataclass
class EditResult:
    """What one edit produced.

    Attributes:
        images: edited PIL images, one per prompt.
        latents: final packed target latents, float32 [B, S_target, 64], before unpacking and decoding.
        target, reference: the target and reference resolutions used.
        sigmas: the schedule that was integrated (steps + 1 values).
        timings_ms: per-component milliseconds, ``total`` and ``glue``.
        calls: calls per component (CLIP and T5 have none, and 0 ms, when the prompt's embeddings were reused).
        warnings: one line per thing the user should know and might not expect: an empty prompt, tokens dropped
            from a long prompt, an explicit size changed by fitting, a tiny reference upscaled.
    """

    images: list[Any]
    latents: torch.Tensor
    target: Resolution
    reference: Resolution
    sigmas: list[float]
    timings_ms: dict[str, float]
    calls: dict[str, int]
    warnings: list[str] = field(default_factory=list)


def input_notices(prompts: list[str], image_size: tuple[int, int], size: tuple[int | None, int | None],
                  target: Resolution, reference: Resolution, max_area: int) -> list[str]:  # fmt: skip
    """What an edit does to its inputs that the user may not expect, one line each: an empty prompt, an explicit
    (width, height) ``size`` that fitting to ``max_area`` changed, a reference so small that it is upscaled many
    times over."""
    notices = [f"prompt {i} is empty: the edit follows no instruction" for i, p in enumerate(prompts) if not p.strip()]
    width, height = size
    if width is not None and height is not None and (target.width, target.height) != (width, height):
        notices.append(
            f"--width {width} --height {height} became {target}: an explicit size is scaled to an area of "
            f"{max_area:,} pixels at the same aspect ratio, each side a multiple of 16"
        )
    if min(image_size) < MIN_REFERENCE_SIDE:
        notices.append(
            f"the reference is {image_size[0]}x{image_size[1]} px, upscaled to {reference}: references under "
            f"{MIN_REFERENCE_SIDE} px on a side carry little for the edit to keep"
        )
    return notices


class KontextPipeline:
    """FLUX.1-Kontext image editing driven by runners.

    Args:
        runners: ``clip``, ``t5``, ``vae_encoder``, ``transformer`` and ``vae_decoder`` runners.
        tokenizer, tokenizer_2: the CLIP and T5 tokenizers.
        dims: the model's sizes.
        vae_scaling, vae_shift: latent normalisation, z = (latent - shift) * scaling.
        scheduler_config: shift parameters of the sigma schedule.
        device: where the runners take their inputs.
        dtype: the runners' compute dtype.
        source: what the runners come from (an engines directory), named when an edit does not fit them.
        sizes: the image sizes the runners take (engines: the build's resolution range); an edit outside it is made
            at sizes inside it, with a notice (``fluxtrt.pipeline.sizes``). None: any size.
        prompt_cache: how many distinct prompt lists keep their CLIP and T5 outputs, so that an edit repeating a
            prompt runs neither encoder (0: encode every time). The kept outputs are copies of what the encoders
            gave, so a reused prompt edits exactly as a fresh one.

    ``sequence_split`` (1 by default; ``--gpus N`` sets N): the number of processes the transformer's sequence is
    split over; an edit whose tokens do not split evenly is refused before any work.

    The pipeline owns its runners: it loads them (a loaded runner stays as it is), and ``close()`` (or leaving a
    ``with`` block) closes them and frees their memory.
    """

    def __init__(
        self,
        runners: Mapping[str, Runner],
        tokenizer: Any,
        tokenizer_2: Any,
        dims: FluxDims,
        vae_scaling: float,
        vae_shift: float,
        scheduler_config: Mapping[str, Any],
        device: torch.device | str,
        dtype: torch.dtype,
        source: str | None = None,
        prompt_cache: int = DEFAULT_PROMPT_CACHE,
        sizes: SizeRange | None = None,
    ):
        self.runners = {name: runner.load() for name, runner in runners.items()}
        self.prompt_cache = prompt_cache
        self._prompts: OrderedDict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, list]] = OrderedDict()
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.dims = dims
        self.vae_scaling, self.vae_shift = vae_scaling, vae_shift
        self.scheduler_config = dict(scheduler_config)
        self.device, self.dtype = torch.device(device), dtype
        self.source = source
        self.sizes = sizes
        self.sequence_split = 1
        # Seconds each part of loading took, where the loader recorded them (load_engine_pipeline: the checks, each
        # engine, the tokenizers; on CUDA an engine's load ends when its work has finished).
        self.load_seconds: dict[str, float] = {}

    def close(self) -> None:
        """Close every runner (engines free their device memory); the pipeline cannot edit afterwards."""
        for runner in self.runners.values():
            runner.close()

    def __enter__(self) -> KontextPipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @classmethod
    def from_components(cls, components: Any, runners: Mapping[str, Runner] | None = None) -> KontextPipeline:
        """A pipeline over loaded ``FluxKontextComponents``; torch runners unless ``runners`` are given."""
        from fluxtrt.backends.torch_runner import torch_runners

        vae = components.vae.config
        return cls(
            runners=runners if runners is not None else torch_runners(components),
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            dims=dims_from_components(components),
            vae_scaling=vae.scaling_factor,
            vae_shift=vae.shift_factor,
            scheduler_config=components.scheduler_config,
            device=components.transformer.device,
            dtype=components.transformer.dtype,
        )

    @property
    def first_block_cache(self) -> SplitTransformerRunner | None:
        """The transformer's runner when it runs as two parts with a first-block cache (engines built with
        ``--first-block-cache``): its ``stats()`` count the computed and skipped steps; None otherwise."""
        runner = self.runners["transformer"]
        return runner if isinstance(runner, SplitTransformerRunner) else None

    def geometry(self, image_size: tuple[int, int], height: int | None, width: int | None, max_area: int,
                 auto_resize: bool = True) -> tuple[Resolution, Resolution]:  # fmt: skip
        """(target, reference) resolutions for a reference of ``image_size`` (width, height): ``fitted_geometry``
        without its notices."""
        target, reference, _ = self.fitted_geometry(image_size, height, width, max_area, auto_resize)
        return target, reference

    def fitted_geometry(
        self,
        image_size: tuple[int, int],
        height: int | None,
        width: int | None,
        max_area: int,
        auto_resize: bool = True,
    ) -> tuple[Resolution, Resolution, list[str]]:
        """(target, reference) resolutions for a reference of ``image_size`` (width, height), and a notice for each
        one changed to fit ``sizes``.

        The reference goes to its closest preferred Kontext resolution, or with ``auto_resize=False`` keeps its own
        size floored to a multiple of 16 (diffusers' ``_auto_resize=False``). The target is the reference's
        resolution by default (so an edit keeps the input's aspect ratio), or the explicit height/width fitted to
        ``max_area``. Where the runners take only ``sizes``, each one outside it is brought inside (``fit_geometry``).

        Raises:
            InputError: no size fits ``sizes``.
        """
        target, reference = wanted_geometry(image_size, height, width, max_area, self.dims.multiple_of, auto_resize)
        if self.sizes is None:
            return target, reference, []
        asked = Resolution(width, height) if height is not None and width is not None else None
        return fit_geometry(target, reference, self.sizes, self.dims.multiple_of, asked, self._engines())

    def _engines(self) -> str:
        return f"the engines of {self.source}" if self.source else "the engines"

    def edit(
        self,
        image: Any | list[Any],
        prompt: str | list[str],
        *,
        sampler: SamplerConfig | None = None,
        seed: int | list[int] = 0,
        guidance: float = DEFAULT_GUIDANCE,
        height: int | None = None,
        width: int | None = None,
        max_area: int = DEFAULT_MAX_AREA,
        auto_resize: bool = True,
        on_step: Callable[[int, int], None] | None = None,
    ) -> EditResult:
        """Edit ``image`` as ``prompt`` says.

        Args:
            image: one PIL image for every prompt, or one per prompt (all are resized to the first one's
                preferred resolution).
            prompt: one prompt, or a list (the batch).
            sampler: solver, sigma schedule, steps.
            seed: seed of the initial noise, drawn on the CPU in the compute dtype (as diffusers draws it); or one
                seed per prompt, each item's noise drawn alone, so that item i of a batch starts from the noise of an
                edit of that prompt alone with ``seeds[i]``.
            guidance: distilled-guidance scale.
            height, width: explicit target size (both or neither).
            max_area: pixel budget an explicit size is fitted to.
            auto_resize: False keeps the reference at its own size (floored to a multiple of 16) instead of its
                preferred Kontext resolution.
            on_step: called as ``on_step(done, total)`` before the first denoising step and after each.

        Returns:
            The images, final latents, geometry, timings and warnings.

        Raises:
            InputError: inconsistent batch or size, or a size outside the engines' range.
            FluxtrtError: the edit produced non-finite values.
        """
        sampler = sampler or SamplerConfig()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        images = image if isinstance(image, list) else [image]
        batch = len(prompts)
        if len(images) not in (1, batch):
            raise InputError(f"{len(images)} images for {batch} prompts: give one image, or one per prompt")
        if not isinstance(seed, int) and len(seed) != batch:
            raise InputError(f"{len(seed)} seeds for {batch} prompts: give one seed, or one per prompt")
        target, reference, fitted = self.fitted_geometry(images[0].size, height, width, max_area, auto_resize)
        self.check_fits(batch, target, reference)
        # An explicit size is reported as fitted to max_area; its fit to the engines' sizes has a notice of its own.
        wanted = target
        if (width, height) != (target.width, target.height):
            wanted = wanted_geometry(images[0].size, height, width, max_area, self.dims.multiple_of, auto_resize)[0]
        notices = input_notices(prompts, images[0].size, (width, height), wanted, reference, max_area) + fitted
        timer = ComponentTimer(self.device)
        with timer.region("total"):
            pooled, text, warnings = self._encode_prompt(prompts, timer)
            ref_tokens, ref_ids = self._encode_reference(images, reference, batch, timer)
            latents, sigmas = self._denoise(
                batch, target, ref_tokens, ref_ids, pooled, text, sampler, seed, guidance, on_step, timer
            )
            h, w = 2 * (target.height // self.dims.multiple_of), 2 * (target.width // self.dims.multiple_of)
            z = unpack(latents, h, w) / self.vae_scaling + self.vae_shift  # [B, 16, h, w]
            with timer.region("vae_decoder"):
                decoded = self.runners["vae_decoder"].infer({"latent": z.to(self.dtype)})["image"]  # [B, 3, H, W]
            out_images = tensor_to_images(decoded)

        final = latents.float().cpu()
        if not torch.isfinite(final).all() or not torch.isfinite(decoded).all():
            raise FluxtrtError(
                f"the edit produced non-finite values (latents finite: {bool(torch.isfinite(final).all())}, "
                f"image finite: {bool(torch.isfinite(decoded).all())}) in {self.dtype}: check the weights, or try "
                "--dtype fp32"
            )
        return EditResult(
            images=out_images,
            latents=final,
            target=target,
            reference=reference,
            sigmas=[float(s) for s in sigmas],
            timings_ms=timer.summary(),
            calls=dict(timer.calls),
            warnings=notices + warnings,
        )

    def check_fits(self, batch: int, target: Resolution, reference: Resolution) -> None:
        """Raise InputError, before any work, when an edit of this geometry lies outside a runner's built range."""
        if self.sequence_split > 1:
            check_sequence(self.dims, target, reference, self.sequence_split)
        dims = dim_values(self.dims, batch, target, reference)
        for name, runner in self.runners.items():
            try:
                runner.check_dims(dims[name])
            except ShapeError as exc:
                where = f" of {self.source}" if self.source else ""
                raise InputError(
                    f"a {target} edit of a {reference} reference (batch {batch}) does not fit the engines{where}: {exc}"
                ) from None

    def _encode_prompt(self, prompts: list[str], timer: ComponentTimer) -> tuple[torch.Tensor, torch.Tensor, list]:
        """CLIP pooled [B, 768] and T5 hidden states [B, 512, 4096], and the truncation warnings; reused from an
        earlier edit of the same prompts when the pipeline keeps them (``prompt_cache``)."""
        key = tuple(prompts)
        if self.prompt_cache > 0 and key in self._prompts:
            self._prompts.move_to_end(key)
            timer.skip("clip")
            timer.skip("t5")
            return self._prompts[key]
        clip_ids, warnings = tokenize(self.tokenizer, prompts, self.dims.clip_len, "CLIP")
        t5_ids, t5_warnings = tokenize(self.tokenizer_2, prompts, self.dims.t5_len, "T5")
        with timer.region("clip"):
            pooled = self.runners["clip"].infer({"input_ids": clip_ids.to(self.device)})["pooled_embeds"]
        with timer.region("t5"):
            text = self.runners["t5"].infer({"input_ids": t5_ids.to(self.device)})["text_embeds"]
        encoded = pooled, text, warnings + t5_warnings
        if self.prompt_cache > 0:
            # A runner may hand back a buffer it overwrites at its next call (a CUDA-graph output): keep copies.
            self._prompts[key] = pooled.clone(), text.clone(), encoded[2]
            while len(self._prompts) > self.prompt_cache:
                self._prompts.popitem(last=False)
        return encoded

    def _encode_reference(self, images: list[Any], reference: Resolution, batch: int,
                          timer: ComponentTimer) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The reference encoded (distribution mode), normalised and packed [B, S_ref, 64]; its ids [S_ref, 3]
        carry image index 1."""
        pixels = images_to_tensor(images, reference).to(self.device, self.dtype)  # [B|1, 3, H, W]
        with timer.region("vae_encoder"):
            ref = self.runners["vae_encoder"].infer({"image": pixels})["latent"]  # [B|1, 16, H/8, W/8]
        ref = (ref - self.vae_shift) * self.vae_scaling
        ref_ids = position_ids(ref.shape[2], ref.shape[3], image_index=1)
        return pack(ref.expand(batch, -1, -1, -1)), ref_ids

    def _denoise(self, batch: int, target: Resolution, ref_tokens: torch.Tensor, ref_ids: torch.Tensor,
                 pooled: torch.Tensor, text: torch.Tensor, sampler: SamplerConfig, seed: int | list[int],
                 guidance: float,
                 on_step: Callable[[int, int], None] | None,
                 timer: ComponentTimer) -> tuple[torch.Tensor, np.ndarray]:  # fmt: skip
        """Noise for the target, integrated over the sampler's sigmas; returns the final packed latents
        [B, S_target, 64] and the sigmas. The reference tokens ride along and their predictions are dropped."""
        dev, dt = self.device, self.dtype
        h, w = 2 * (target.height // self.dims.multiple_of), 2 * (target.width // self.dims.multiple_of)
        # Drawn on the CPU in the compute dtype, as diffusers draws it: the same seed gives diffusers' noise on every
        # device (a bf16 draw is not an fp32 draw rounded in every torch release).
        seeds = [seed] if isinstance(seed, int) else list(seed)
        shape = (batch if len(seeds) == 1 else 1, self.dims.latent_channels, h, w)
        noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=dt) for s in seeds])
        latents = pack(noise).to(dev)  # [B, S_target, 64]
        s_target = latents.shape[1]
        img_ids = torch.cat([position_ids(h, w, image_index=0), ref_ids]).to(dev)  # [S_target + S_ref, 3]
        txt_ids = torch.zeros(self.dims.t5_len, 3, device=dev)
        guidance_t = torch.full((batch,), guidance, dtype=torch.float32, device=dev)
        sigmas = sigma_schedule(sampler.sigmas, sampler.num_steps, flux_mu(s_target, self.scheduler_config))
        solver = make_solver(sampler.solver)
        solver.reset(sigmas)
        if on_step is not None:
            on_step(0, sampler.num_steps)
        for i in range(sampler.num_steps):
            feed = {
                "hidden_states": torch.cat([latents, ref_tokens], dim=1),  # [B, S_target + S_ref, 64]
                "encoder_hidden_states": text,
                "pooled_projections": pooled,
                "timestep": diffusers_timestep(sigmas[i], batch, dev, dt),
                "guidance": guidance_t,
                "img_ids": img_ids,
                "txt_ids": txt_ids,
            }
            with timer.region("transformer"):
                v = self.runners["transformer"].infer(feed)["noise_pred"][:, :s_target]
            latents = solver.step(v, i, latents)
            if on_step is not None:
                on_step(i + 1, sampler.num_steps)
        return latents, sigmas
