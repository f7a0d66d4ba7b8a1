"""The aotinductor backend's options, each declared once with its ``fluxtrt build`` flag (see the package
docstring for what they do)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fluxtrt.backends.base import BackendOptions, cuda_graph_option, option

WEIGHTS = ("packaged", "external")


@dataclass(frozen=True)
class AotInductorOptions(BackendOptions):
    """The aotinductor backend's settings (see the module docstring)."""

    weights: str = option(
        "packaged",
        "--aoti-weights",
        choices=WEIGHTS,
        help="aotinductor: packaged (in the .pt2, default) or external (<component>.safetensors "
        "beside a code-only package; for the full-size transformer).",
    )
    cuda_graph: bool = cuda_graph_option()
    fp8_attention: bool | None = option(
        None,
        "--aoti-fp8-attention/--aoti-no-fp8-attention",
        help="aotinductor: the transformer's attention on FP8 Q/K/V (FA3 or cuDNN FP8 "
        "SDPA). Default: on for --precision fp8 on cuda when a kernel is available.",
    )
    # Set from code only (benchmarks): inductor settings the package is compiled with.
    inductor_configs: dict[str, Any] = field(default_factory=dict)
