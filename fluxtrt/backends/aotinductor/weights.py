"""The transformer's linears among an AOTInductor package's external constants, for weights given at run time (LoRA).

A linear's weight is the constant ``transformer.<module>.weight`` [out, in]. Fused Q/K/V projections (``to_qkv``,
``to_added_qkv``) stack the rows of the model's three linears. An FP8 linear (``StaticFp8Linear``) keeps its weight
as float8_e4m3fn beside two more constants: ``output_scale`` [1, out] (the weight's per-channel scale times the
input's) and ``input_inverse_scale`` [1, 1] (the calibrated input scale's reciprocal). Its original weight is the
dequantized one; a new weight is quantized again as the build quantizes (``fp8_linear_constants``: new per-channel
scales), with the calibrated input scale kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fluxtrt.errors import EngineError

# Projections the build fuses (diffusers' fuse_qkv_projections) -> the model's linears whose rows they stack.
FUSED = {"attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "attn.to_added_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}  # fmt: skip
FP8_SCALES = ("output_scale", "input_inverse_scale")
PREFIX = "transformer."  # TransformerModule keeps the diffusers model as .transformer


@dataclass(frozen=True)
class PackedLinear:
    """One linear's weight among the constants: its name, the model linears whose rows it stacks (in order), and
    whether it is FP8."""

    constant: str
    modules: tuple[str, ...]
    fp8: bool

    @property
    def stem(self) -> str:
        return self.constant.removesuffix(".weight")

    def rows(self, index: int, out: int) -> slice:
        """The rows of ``modules[index]`` in a weight of ``out`` rows."""
        step = out // len(self.modules)
        return slice(index * step, (index + 1) * step)


def _modules(module: str) -> tuple[str, ...]:
    for fused, names in FUSED.items():
        if module.endswith(fused):
            prefix = module[: -len(fused)]
            return tuple(prefix + n for n in names)
    return (module,)


def packed_linears(constants: Mapping[str, Any], where: str, rebuild: str) -> dict[str, PackedLinear]:
    """Constant name -> the linear whose weight it is, for every floating-point 2-D ``*.weight`` of ``constants``.

    Raises:
        EngineError: an FP8 weight whose scales are no constants (folded into the code): ``where`` (the engine) and
            ``rebuild`` (how to build one without) name it.
    """
    import torch

    out = {}
    for name, t in constants.items():
        if not (name.endswith(".weight") and t.dim() == 2 and t.is_floating_point()):
            continue
        fp8 = t.dtype == torch.float8_e4m3fn
        if not fp8 and t.element_size() < 2:
            continue
        stem = name.removesuffix(".weight")
        missing = [s for s in FP8_SCALES if f"{stem}.{s}" not in constants] if fp8 else []
        if missing:
            raise EngineError(f"{where} keeps no constant {stem}.{missing[0]} for its FP8 weight {name} (it is "
                              "compiled into the code), so a LoRA cannot quantize that weight again: "
                              f"{rebuild} --precision bf16 --aoti-weights external")  # fmt: skip
        out[name] = PackedLinear(name, _modules(stem.removeprefix(PREFIX)), fp8)
    return out


class LinearWeights(Mapping):
    """Module name -> the original weight [out, in] of each linear: a view of its constant's rows, or for an FP8
    linear its dequantized weight (fp32), computed when asked for; ``shapes`` without computing any."""

    def __init__(self, constants: Mapping[str, Any], packed: Mapping[str, PackedLinear]):
        self.constants = constants
        self.where = {m: (p, i) for p in packed.values() for i, m in enumerate(p.modules)}
        self.shapes = {m: self._shape(p) for m, (p, _) in self.where.items()}

    def _shape(self, packed: PackedLinear) -> tuple[int, int]:
        out, inp = self.constants[packed.constant].shape
        return out // len(packed.modules), inp

    def __getitem__(self, module: str) -> Any:
        packed, index = self.where[module]
        return original_rows(self.constants, packed, index)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def original_rows(constants: Mapping[str, Any], packed: PackedLinear, index: int) -> Any:
    """The original weight of ``packed.modules[index]``: its rows of the constant (a view), dequantized if FP8."""
    from fluxtrt.kernels.fp8_linear import fp8_linear_weight

    weight = constants[packed.constant]
    rows = packed.rows(index, weight.shape[0])
    if not packed.fp8:
        return weight[rows]
    scale, inverse = (constants[f"{packed.stem}.{s}"] for s in FP8_SCALES)
    return fp8_linear_weight(weight[rows], scale[:, rows], inverse)


def merged_constants(constants: Mapping[str, Any], packed: PackedLinear, weights: Mapping[str, Any]) -> dict[str, Any]:
    """The constants that make ``packed`` compute ``weights[module]`` for its modules there (the original rows for
    the others): its weight, and for an FP8 linear its ``output_scale``, quantized again with new per-channel scales
    and the calibrated input scale (kept as it is)."""
    import torch

    from fluxtrt.kernels.fp8_linear import fp8_linear_constants

    weight = constants[packed.constant]
    if not packed.fp8:
        pieces = [weights[m].to(weight.dtype) if m in weights else weight[packed.rows(i, weight.shape[0])]
                  for i, m in enumerate(packed.modules)]  # fmt: skip
        return {packed.constant: (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).contiguous()}
    scale_name = f"{packed.stem}.output_scale"
    scale, inverse = constants[scale_name], constants[f"{packed.stem}.input_inverse_scale"]
    qs, scales = [], []
    for i, module in enumerate(packed.modules):
        rows = packed.rows(i, weight.shape[0])
        if module in weights:
            q, s = fp8_linear_constants(weights[module], 1.0 / inverse)
        else:
            q, s = weight[rows], scale[:, rows]
        qs.append(q)
        scales.append(s)
    return {packed.constant: torch.cat(qs).contiguous(), scale_name: torch.cat(scales, dim=1).contiguous()}
