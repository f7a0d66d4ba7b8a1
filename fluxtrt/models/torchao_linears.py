"""Low-precision transformer linears through torchao, for stage 3 and the 24 GB mode (not to be confused with
``fluxtrt.quant``, the static quantization of engines) (torchao is imported only here, only when asked for).

Quantized: the token-wise linears inside the transformer blocks (attention projections, MLPs). Left in the model's
dtype: the modulation linears (one token per image), the embedders, norm_out and proj_out, as in DESIGN 5 and 9.
"""

from __future__ import annotations

from typing import Any

import torch

from fluxtrt.environment import require_cuda_sm
from fluxtrt.errors import MissingDependencyError

_BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
_UNFUSED = (".to_q", ".to_k", ".to_v", ".add_q_proj", ".add_k_proj", ".add_v_proj")


def token_linear_filter(transformer: torch.nn.Module, prefix: str = ""):
    """A torchao ``filter_fn``: the token-wise ``nn.Linear`` layers of the blocks that the forward uses.

    With fused QKV, the separate Q/K/V projections diffusers keeps beside the fused one are not used, so they are
    left alone.

    Args:
        transformer: the transformer, or one of its blocks.
        prefix: the block's name in the transformer with a trailing dot (``"transformer_blocks.3."``), for a block.
    """
    fused = any(getattr(m, "fused_projections", False) for m in transformer.modules())

    def keep(module: torch.nn.Module, fqn: str) -> bool:
        fqn = prefix + fqn
        if not isinstance(module, torch.nn.Linear) or not fqn.startswith(_BLOCK_PREFIXES):
            return False
        if ".norm" in fqn:  # norm1.linear, norm1_context.linear, norm.linear: the AdaLN modulation
            return False
        return not (fused and fqn.endswith(_UNFUSED))

    return keep


def torchao_config(quant: str, device: Any) -> tuple[Any, str]:
    """torchao's config for ``quant`` on ``device`` and the name of the path.

    Raises:
        DeviceError: the GPU lacks tensor cores for ``quant``.
        MissingDependencyError: torchao is not installed.
    """
    fix = "use quant=fp8" if quant == "fp4" else "use a stage without quant"
    require_cuda_sm(device, quant, fix, f"{quant.upper()} linears")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        feature = f"{quant.upper()} linears (stage 3)"
        raise MissingDependencyError("torchao", feature, "pip install 'fluxtrt[torchao]'") from None
    if quant == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        # set_inductor_config=False: torchao's recommended inductor settings (coordinate-descent tuning) multiply
        # compile time and would change the compile of every stage measured after this one.
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
        return config, "torchao Float8DynamicActivationFloat8WeightConfig per-row"
    from torchao.prototype.mx_formats import NVFP4DynamicActivationNVFP4WeightConfig

    config = NVFP4DynamicActivationNVFP4WeightConfig(use_triton_kernel=False)  # no MSLK dependency
    return config, "torchao NVFP4DynamicActivationNVFP4WeightConfig"


def quantize_transformer(transformer: torch.nn.Module, quant: str) -> str:
    """Quantize the transformer's token-wise linears in place; returns a description of the path taken.

    Args:
        transformer: a diffusers ``FluxTransformer2DModel`` on a CUDA device.
        quant: ``fp8`` (dynamic per-row activations and weights, Float8DynamicActivationFloat8WeightConfig) or
            ``fp4`` (NVFP4 dynamic activations and weights).

    Raises:
        DeviceError: the GPU lacks tensor cores for ``quant``.
        MissingDependencyError: torchao is not installed.
    """
    config, path = torchao_config(quant, next(transformer.parameters()).device)
    from torchao.quantization import quantize_

    keep = token_linear_filter(transformer)
    count = sum(keep(m, n) for n, m in transformer.named_modules())
    quantize_(transformer, config, filter_fn=keep)
    return f"{path}, {count} linears"


def quantize_block(block: torch.nn.Module, name: str, config: Any) -> int:
    """Quantize one transformer block's token-wise linears in place with torchao ``config`` (from
    ``torchao_config``); ``name`` is the block's name in the transformer. Returns how many were quantized."""
    from torchao.quantization import quantize_

    keep = token_linear_filter(block, f"{name}.")
    count = sum(keep(m, n) for n, m in block.named_modules())
    quantize_(block, config, filter_fn=keep)
    return count
