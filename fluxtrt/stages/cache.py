"""First-block cache: a transformer runner that skips the blocks after the first when their input barely moved.

Each step runs the embeddings and the first double block. If the first block's residual (its output minus its input)
changed by less than ``threshold`` relative to the last computed step's, the remaining 56 blocks are skipped and
their cached residual is added instead; otherwise they run and the cache is refreshed. How many steps skip depends
on the real weights (on random weights the rate means nothing); computed and skipped steps are timed apart, so the
gain for a checkpoint is predictable from its skip count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fluxtrt.backends.runner import Runner
from fluxtrt.specs.component import ComponentSpec
from fluxtrt.timing import EventClock


@dataclass
class CacheStats:
    """Steps of one edit: how many computed every block, how many reused the cache, what each cost (ms), and the
    relative change of the first block's residual that each decision saw (what a threshold is tuned against)."""

    computed: int = 0
    skipped: int = 0
    computed_ms: list[float] = field(default_factory=list)
    skipped_ms: list[float] = field(default_factory=list)
    changes: list[float] = field(default_factory=list)  # relative residual change per step after the first

    @property
    def mean_computed_ms(self) -> float | None:
        return sum(self.computed_ms) / len(self.computed_ms) if self.computed_ms else None

    @property
    def mean_skipped_ms(self) -> float | None:
        return sum(self.skipped_ms) / len(self.skipped_ms) if self.skipped_ms else None


class FirstBlockCacheRunner(Runner):
    """The FLUX transformer with a first-block cache, as a runner with the transformer spec's contract.

    The forward is diffusers' FluxTransformer2DModel.forward written out (without ControlNet and IP-Adapter inputs),
    calling the model's own submodules, so regional compilation of its blocks applies here too. With threshold 0
    every step is computed and the output equals the plain transformer's.

    A new edit is detected when the timestep rises (sigmas fall within an edit); ``reset()`` starts one
    explicitly.

    Args:
        spec: the transformer spec.
        transformer: a diffusers ``FluxTransformer2DModel``.
        threshold: relative change of the first block's residual below which a step is skipped.
        compute_dtype: the model's dtype.
    """

    def __init__(self, spec: ComponentSpec, transformer: torch.nn.Module, threshold: float, compute_dtype: Any):
        super().__init__(spec, compute_dtype, transformer.device)
        self.transformer = transformer
        self.threshold = float(threshold)
        self.reset()
        self.load()  # the model is the caller's and already in memory

    def reset(self) -> None:
        """Forget the cache and start counting a new edit."""
        self._first_residual: torch.Tensor | None = None
        self._rest_residual: torch.Tensor | None = None
        self._last_t: float | None = None
        self._changes: list[float] = []
        self._clock = EventClock(self.transformer.device)

    def stats(self) -> CacheStats:
        """Counts and per-step milliseconds of the current (or last) edit."""
        out = CacheStats(changes=list(self._changes))
        for label, ms in self._clock.resolve():
            if label == "computed":
                out.computed += 1
                out.computed_ms.append(ms)
            else:
                out.skipped += 1
                out.skipped_ms.append(ms)
        return out

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        t_now = float(feed["timestep"][0])  # a host sync, which the skip decision needs anyway
        if self._last_t is not None and t_now > self._last_t:
            self.reset()
        self._last_t = t_now
        start = self._clock.start()
        with torch.inference_mode():
            out, label = self._forward(feed)
        self._clock.stop(label, start)
        return {self.spec.output_names[0]: out}

    def _forward(self, feed: Mapping[str, Any]) -> tuple[torch.Tensor, str]:
        tr = self.transformer
        hidden = tr.x_embedder(feed["hidden_states"])  # [B, S, D]
        timestep = feed["timestep"].to(hidden.dtype) * 1000
        pooled = feed["pooled_projections"]
        if tr.config.guidance_embeds:
            guidance = feed["guidance"].to(hidden.dtype) * 1000
            temb = tr.time_text_embed(timestep, guidance, pooled)  # [B, D]
        else:
            temb = tr.time_text_embed(timestep, pooled)
        context = tr.context_embedder(feed["encoder_hidden_states"])  # [B, 512, D]
        rope = tr.pos_embed(torch.cat((feed["txt_ids"], feed["img_ids"]), dim=0))  # cos, sin: [512 + S, head_dim]

        first, *rest = tr.transformer_blocks
        context, after_first = first(
            hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rope
        )
        first_residual = after_first - hidden

        if self._skip(first_residual):
            hidden = after_first + self._rest_residual
            label = "skipped"
        else:
            hidden = after_first
            for block in rest:
                context, hidden = block(
                    hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rope
                )
            for block in tr.single_transformer_blocks:
                context, hidden = block(
                    hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rope
                )
            self._rest_residual = hidden - after_first
            self._first_residual = first_residual
            label = "computed"
        return tr.proj_out(tr.norm_out(hidden, temb)), label  # [B, S, 64]

    def _skip(self, first_residual: torch.Tensor) -> bool:
        if self._first_residual is None or self._rest_residual is None:
            return False
        prev = self._first_residual.float()
        change = ((first_residual.float() - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)).item()
        self._changes.append(change)
        return change < self.threshold
