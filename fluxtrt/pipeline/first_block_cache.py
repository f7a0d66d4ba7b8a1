"""The first-block cache, one rule for the PyTorch stages and the engines: a transformer runner made of two parts that
skips the second when the first block's residual barely moved.

Each step runs the first part (embeddings and the first double block). If the first block's residual (its output
minus its input) changed by less than ``threshold`` relative to the last computed step's, the remaining blocks are
skipped and their cached residual is added instead; otherwise the second part runs and the cache is refreshed. How
many steps skip depends on the real weights (on random weights the rate means nothing); computed and skipped steps
are timed apart, so the gain for a checkpoint is predictable from its skip count:
time per edit = n_computed * t_computed + n_skipped * t_skipped + the rest of the edit.

The parts are any runners with the specs ``transformer_first`` and ``transformer_rest`` (``fluxtrt.specs.flux``):
torch modules (stages 1-4) or engines built with ``fluxtrt build --first-block-cache``.
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

    def to_dict(self) -> dict:
        """What compare records per edit."""
        return {
            "computed": self.computed,
            "skipped": self.skipped,
            "mean_computed_ms": self.mean_computed_ms,
            "mean_skipped_ms": self.mean_skipped_ms,
            "changes": list(self.changes),
        }


def relative_change(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """mean |residual - previous| / mean |previous|, in fp32 (a host sync)."""
    prev = previous.float()
    return ((residual.float() - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)).item()


class SplitTransformerRunner(Runner):
    """The transformer as two part runners with a first-block cache: the transformer spec's contract.

    With threshold 0 (or None: no cache) every step is computed and the output is the monolithic transformer's. A
    new edit is detected when the timestep rises (sigmas fall within an edit); ``reset()`` starts one explicitly.

    Args:
        spec: the transformer spec (what the pipeline feeds and reads).
        first, rest: runners of ``transformer_first`` and ``transformer_rest``; loading and closing go through.
        threshold: relative change of the first block's residual below which a step is skipped; None never skips.
    """

    def __init__(self, spec: ComponentSpec, first: Runner, rest: Runner, threshold: float | None):
        super().__init__(spec, first.compute_dtype, first.device)
        self.first, self.rest = first, rest
        self.threshold = None if threshold is None else float(threshold)
        self._zeros: torch.Tensor | None = None
        self.reset()
        self._loaded = first.is_loaded and rest.is_loaded

    def reset(self) -> None:
        """Forget the cache and start counting a new edit."""
        self._first_residual: torch.Tensor | None = None
        self._rest_residual: torch.Tensor | None = None
        self._last_t: float | None = None
        self._changes: list[float] = []
        self._clock = EventClock(self.device)

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

    def check_dims(self, dims: Mapping[str, int]) -> None:
        """Both parts' built ranges."""
        self.first.check_dims(dims)
        self.rest.check_dims(dims)

    def _load(self) -> None:
        self.first.load()
        self.rest.load()

    def _close(self) -> None:
        self.first.close()
        self.rest.close()
        self._first_residual = self._rest_residual = self._zeros = None

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        t_now = float(feed["timestep"][0])  # a host sync, which the skip decision needs anyway
        if self._last_t is not None and t_now > self._last_t:
            self.reset()
        self._last_t = t_now
        start = self._clock.start()
        with torch.inference_mode():
            out, label = self._step(feed)
        self._clock.stop(label, start)
        return {self.spec.output_names[0]: out}

    def _step(self, feed: Mapping[str, Any]) -> tuple[torch.Tensor, str]:
        hidden = feed["hidden_states"]  # [B, S, 64]
        rest_residual = self._rest_residual
        shape = (hidden.shape[0], hidden.shape[1], self.first.spec.outputs[0].shape[-1])  # [B, S, D]
        if rest_residual is None or tuple(rest_residual.shape) != shape:
            if self._zeros is None or tuple(self._zeros.shape) != shape:
                self._zeros = torch.zeros(shape, dtype=self.compute_dtype, device=hidden.device)
            rest_residual = self._zeros  # no step computed yet: cached_pred is unused
        first = self.first.infer({**feed, "rest_residual": rest_residual})
        if self._skip(first["first_residual"]):
            return first["cached_pred"], "skipped"
        handed = {name: first[name] if name in first else feed[name] for name in self.rest.spec.input_names}
        rest = self.rest.infer(handed)  # hidden, encoder_hidden, temb from the first part; the ids from the feed
        self._first_residual, self._rest_residual = first["first_residual"], rest["rest_residual"]
        return rest["noise_pred"], "computed"

    def _skip(self, first_residual: torch.Tensor) -> bool:
        if self.threshold is None or self._first_residual is None or self._rest_residual is None:
            return False
        change = relative_change(first_residual, self._first_residual)
        self._changes.append(change)
        return change < self.threshold
