"""The aotinductor backend's options, each declared once with its ``fluxtrt build`` flag (see the package
docstring for what they do), and the record of a package it built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fluxtrt.backends.base import BackendOptions, cuda_graph_option, option
from fluxtrt.backends.record import BackendRecord
from fluxtrt.environment import DeviceEnvironment

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


@dataclass
class AotInductorRecord(BackendRecord):
    """What an AOTInductor package is tied to (torch, device and on CUDA the GPU and its SM) and how it was built:
    fused Q/K/V projections, static FP8 linears and sigmoid-form GELUs replaced (counts), whether attention runs on
    FP8 (and why not, where the default could not have it), how export kept the shape guards, the dynamic symbols'
    [min, max] and the attention kernels the package calls."""

    torch: str | None = None
    device: str | None = None
    gpu: str | None = None
    sm: int | None = None
    fused_qkv: int | None = None
    fp8_linears: int | None = None
    sigmoid_form_gelus: int | None = None
    fp8_attention: bool | None = None
    fp8_attention_unavailable: str | None = None
    fp8_attention_scales: str | None = None
    shape_guards: str | None = None
    dims: dict[str, list[int]] | None = None
    attention: list[str] | None = None
    # Seconds the build spent in torch.export, in inductor's compile into the package, and writing the external
    # weights (where a long build goes); not what makes two records equal.
    export_s: float | None = field(default=None, compare=False)
    compile_s: float | None = field(default=None, compare=False)
    weights_s: float | None = field(default=None, compare=False)
    # Inductor's own timed phases of the compile that took a second or more (nested: a phase includes those it calls).
    compile_phases_s: dict[str, float] | None = field(default=None, compare=False)

    @classmethod
    def built_in(cls, env: DeviceEnvironment) -> AotInductorRecord:
        """A record of a package built in ``env``, the rest to be filled in."""
        return cls(torch=env.torch, device=env.device, gpu=env.gpu, sm=env.sm)
