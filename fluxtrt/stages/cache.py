"""First-block cache of the PyTorch stages: the split transformer runner (``fluxtrt.pipeline.first_block_cache``, the
rule engines share) over the two part modules of the loaded model.

Each step runs the embeddings and the first double block. If the first block's residual (its output minus its input)
changed by less than ``threshold`` relative to the last computed step's, the remaining 56 blocks are skipped and
their cached residual is added instead; otherwise they run and the cache is refreshed.
"""

from __future__ import annotations

from typing import Any

import torch

from fluxtrt.backends.torch_modules import TransformerFirstModule, TransformerRestModule
from fluxtrt.backends.torch_runner import TorchRunner
from fluxtrt.pipeline.first_block_cache import CacheStats, SplitTransformerRunner
from fluxtrt.specs.component import ComponentSpec
from fluxtrt.specs.flux import transformer_part_specs

__all__ = ["CacheStats", "FirstBlockCacheRunner"]


class FirstBlockCacheRunner(SplitTransformerRunner):
    """The FLUX transformer with a first-block cache, as a runner with the transformer spec's contract.

    The parts call the model's own submodules (``TransformerFirstModule``, ``TransformerRestModule``: diffusers'
    forward written out), so regional compilation of its blocks applies here too. With threshold 0 every step is
    computed and the output equals the plain transformer's.

    Args:
        spec: the transformer spec.
        transformer: a diffusers ``FluxTransformer2DModel``.
        threshold: relative change of the first block's residual below which a step is skipped.
        compute_dtype: the model's dtype.
    """

    def __init__(self, spec: ComponentSpec, transformer: torch.nn.Module, threshold: float, compute_dtype: Any):
        config = transformer.config
        specs = transformer_part_specs(spec.inputs, config.num_attention_heads * config.attention_head_dim)
        first = TorchRunner(specs["transformer_first"], TransformerFirstModule(transformer).eval(), compute_dtype)
        rest = TorchRunner(specs["transformer_rest"], TransformerRestModule(transformer).eval(), compute_dtype)
        super().__init__(spec, first, rest, threshold)
        self.transformer = transformer
