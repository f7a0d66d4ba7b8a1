"""Spec objects shared by export, engine profiles, runtime binding checks and tests.

A shape entry is either an int (fixed) or a symbol such as ``"B"`` or ``"S"``. Symbol values come from
``fluxtrt.specs.flux.dim_values`` for a batch size and a pair of resolutions, so every profile shape derives from a
resolution range instead of literals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fluxtrt.errors import ShapeError

# "compute" means the model's compute dtype (fp32 or bf16); other entries are fixed.
DTYPES = ("compute", "float32", "int64")


@dataclass(frozen=True)
class Tolerance:
    """Allowed difference between two runners of one component: |a - b| <= atol + rtol * |b|."""

    atol: float
    rtol: float


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output.

    Args:
        name: binding name (ONNX input/output name, engine binding, feed key).
        shape: ints and symbols, e.g. ``("B", "S", 64)``.
        dtype: ``compute``, ``float32`` or ``int64``.
        sample: how a sample value is drawn: ``normal``, ``unit`` (uniform [0, 1]), ``signed`` (uniform [-1, 1]),
            ``ids`` (token ids below ``vocab``), ``grid`` (position ids) or ``const`` (the ``value``).
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    sample: str = "normal"
    vocab: int = 0
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype '{self.dtype}' of {self.name} is not one of {DTYPES}")

    def concrete(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The shape with every symbol replaced by its value in ``dims``."""
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)


@dataclass(frozen=True)
class ComponentSpec:
    """Everything fluxtrt knows about one exportable component.

    Args:
        name: ``clip``, ``t5``, ``vae_encoder``, ``transformer`` or ``vae_decoder``.
        inputs, outputs: the bindings, in call order.
        tolerance: per compute dtype (``fp32``/``bf16``), the allowed difference between two runners.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: Mapping[str, Tolerance]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Symbolic axes per binding, in the form ``torch.onnx.export(dynamic_axes=...)`` takes."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs + self.outputs}

    def shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes for one set of symbol values."""
        return {t.name: t.concrete(dims) for t in self.inputs}

    def check_feed(self, feed: Mapping[str, Any], compute_dtype: Any) -> dict[str, int]:
        """Validate a feed against the spec and return the symbol values it implies.

        Args:
            feed: binding name -> torch tensor.
            compute_dtype: the torch dtype that ``compute`` stands for.

        Raises:
            ShapeError: a missing or unexpected name, a wrong dtype or rank, a fixed dimension that differs, or one
                symbol with two values.
        """
        import torch

        missing = [n for n in self.input_names if n not in feed]
        extra = [n for n in feed if n not in self.input_names]
        if missing or extra:
            raise ShapeError(
                f"{self.name}: feed has names {sorted(feed)} but the spec expects {list(self.input_names)} "
                f"(missing {missing}, unexpected {extra})"
            )
        fixed = {"float32": torch.float32, "int64": torch.int64}
        seen: dict[str, tuple[int, str]] = {}
        for t in self.inputs:
            value = feed[t.name]
            want = compute_dtype if t.dtype == "compute" else fixed[t.dtype]
            if value.dtype != want:
                raise ShapeError(f"{self.name}.{t.name} has dtype {value.dtype}, expected {want}")
            if value.dim() != len(t.shape):
                raise ShapeError(
                    f"{self.name}.{t.name} has shape {tuple(value.shape)}, expected rank {len(t.shape)} {t.shape}"
                )
            for axis, (want_dim, got) in enumerate(zip(t.shape, value.shape, strict=True)):
                if isinstance(want_dim, int):
                    if got != want_dim:
                        raise ShapeError(
                            f"{self.name}.{t.name} has size {got} on axis {axis}, expected {want_dim} (shape {t.shape})"
                        )
                elif want_dim in seen and seen[want_dim][0] != got:
                    raise ShapeError(
                        f"{self.name}.{t.name} has {want_dim}={got} on axis {axis} but {seen[want_dim][1]} has "
                        f"{want_dim}={seen[want_dim][0]}: the inputs must agree"
                    )
                else:
                    seen.setdefault(want_dim, (got, t.name))
        return {k: v[0] for k, v in seen.items()}

    def sample_feed(self, dims: Mapping[str, int], compute_dtype: Any, device: Any = "cpu", seed: int = 0) -> dict:
        """Random inputs of the right names, shapes and dtypes, drawn from a seeded generator on the CPU."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        feed = {}
        for t in self.inputs:
            shape = t.concrete(dims)
            if t.sample == "ids":
                value = torch.randint(0, t.vocab, shape, generator=gen, dtype=torch.int64)
            elif t.sample == "grid":
                value = torch.randint(0, 64, shape, generator=gen).float()
            elif t.sample == "unit":
                value = torch.rand(shape, generator=gen)
            elif t.sample == "signed":
                value = torch.rand(shape, generator=gen) * 2 - 1
            elif t.sample == "const":
                value = torch.full(shape, t.value)
            else:
                value = torch.randn(shape, generator=gen)
            if t.dtype != "int64":
                value = value.to(compute_dtype if t.dtype == "compute" else torch.float32)
            feed[t.name] = value.to(device)
        return feed
