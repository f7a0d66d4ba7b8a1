"""The tanh GELU of FLUX's MLPs in its sigmoid form, for compiled engines.

``0.5 x (1 + tanh(u)) = x * sigmoid(2u)`` with ``u = sqrt(2 / pi) (x + 0.044715 x^3)``: the same function. Inductor
computes ``tanh`` with libdevice's ``tanhf`` (a branch and a polynomial per element) and ``sigmoid`` with one fast
exponential and a reciprocal, so the kernel that applies the GELU and quantizes its output to FP8 does less per
element: in a 1024x1024 step on an H200, the single blocks' GELU kernels went from 10.8 to 8.8 ms
(benchmarks/results/README.md, step_levers2_h200.json).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_TWO_SQRT_2_OVER_PI = 2.0 * (2.0 / torch.pi) ** 0.5


def sigmoid_form_gelu(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` computed as ``x * sigmoid(2u)`` in fp32, rounded once to x's dtype."""
    f = x.float()
    return (f * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (f + 0.044715 * f * f * f))).to(x.dtype)


class SigmoidFormGelu(nn.Module):
    """``nn.GELU(approximate="tanh")`` as ``sigmoid_form_gelu``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sigmoid_form_gelu(x)


@contextlib.contextmanager
def sigmoid_form_gelus(model: nn.Module) -> Iterator[int]:
    """Every tanh GELU of ``model`` (``nn.GELU(approximate="tanh")`` modules and diffusers' ``GELU`` projections with
    ``approximate="tanh"``) computed by ``sigmoid_form_gelu`` for the duration; put back on exit.

    Yields:
        how many GELUs were swapped.
    """
    swapped: list[tuple[str, nn.Module]] = []
    patched: list[nn.Module] = []
    try:
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.GELU) and module.approximate == "tanh":
                model.set_submodule(name, SigmoidFormGelu())
                swapped.append((name, module))
            elif getattr(module, "approximate", None) == "tanh" and callable(getattr(type(module), "gelu", None)):
                module.gelu = sigmoid_form_gelu  # diffusers' GELU: proj, then self.gelu(hidden)
                patched.append(module)
        yield len(swapped) + len(patched)
    finally:
        for name, original in reversed(swapped):
            model.set_submodule(name, original)
        for module in patched:
            del module.gelu
