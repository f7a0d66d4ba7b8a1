"""Flow-matching ODE solvers. The model predicts the velocity v = noise - x0, so x0 = x - sigma v."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from fluxtrt.errors import InputError
from fluxtrt.schedulers.sigmas import validate_sigmas


class Solver(ABC):
    """Integrates dx/dsigma = v from sigmas[0] to sigmas[-1] = 0, one model call per step.

    ``reset(sigmas)`` starts a new edit (clearing any history), ``step(v, i, x)`` advances x from sigmas[i] to
    sigmas[i + 1]. Arithmetic is float32 for half and single precision latents and float64 for float64 latents
    (sigmas rounded to that dtype, as diffusers does); the result is cast back to the latents' dtype.
    """

    sigmas: np.ndarray | None = None

    def reset(self, sigmas: np.ndarray) -> None:
        """Start a new edit on ``sigmas``, forgetting the history of any previous one.

        Args:
            sigmas: steps + 1 noise levels in [0, 1], strictly decreasing, ending with 0.

        Raises:
            InputError: sigmas that are not such a schedule.
        """
        self.sigmas = validate_sigmas(sigmas)
        self._sigmas32 = self.sigmas.astype(np.float32)

    @abstractmethod
    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """x at sigmas[i + 1] from x and the model's velocity v at sigmas[i].

        Args:
            v: the model's velocity at (x, sigmas[i]), same shape as x.
            i: step index, 0 <= i < len(sigmas) - 1.
            x: latents at sigmas[i].

        Returns:
            Latents at sigmas[i + 1], in x's dtype.

        Raises:
            InputError: reset was not called or i is out of range.
        """

    def _prepare(self, i: int, x: torch.Tensor) -> tuple[torch.dtype, np.ndarray]:
        """The compute dtype for x and the sigmas rounded to it, after checking the step index."""
        if self.sigmas is None:
            raise InputError(f"step {i} was called before any schedule was set: call solver.reset(sigmas) first")
        if not 0 <= i < len(self.sigmas) - 1:
            raise InputError(f"step index is {i}, expected 0 <= i < {len(self.sigmas) - 1}: step through the schedule")
        dtype = torch.promote_types(x.dtype, torch.float32)
        return dtype, (self.sigmas if dtype == torch.float64 else self._sigmas32)


class EulerSolver(Solver):
    """x_next = x + (sigma_next - sigma) v: diffusers' FlowMatchEulerDiscreteScheduler step."""

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        dtype, sigmas = self._prepare(i, x)
        dt = float(sigmas[i + 1] - sigmas[i])  # difference taken in the compute dtype, like diffusers
        return (x.to(dtype) + dt * v.to(dtype)).to(x.dtype)


class DPMSolverPP2M(Solver):
    """DPM-Solver++ 2M (Lu et al. 2022) on the data prediction x0 = x - sigma v, with alpha = 1 - sigma.

    With lambda = log(alpha / sigma) and h = lambda_next - lambda, the first-order (DDIM) update is
    x_next = (sigma_next / sigma) x - alpha_next (exp(-h) - 1) D = r x + (1 - r) D with r = sigma_next / sigma,
    since alpha = 1 - sigma (for D = x0 it equals the Euler step). 2M takes D = x0 + h / (2 h_prev) (x0 - x0_prev),
    a backward difference in lambda. It is first order on the first step (no history) and on the last one, where
    sigma_next = 0 and lambda = inf: x_next = x0. From sigma = 1 (lambda = -inf) h_prev is infinite, so the second
    step is first order too.
    """

    def reset(self, sigmas: np.ndarray) -> None:
        """``Solver.reset``, plus the per-step weights of the 2M update; forgets the previous edit's x0."""
        super().reset(sigmas)
        s = self.sigmas
        with np.errstate(divide="ignore"):
            lam = np.log1p(-s) - np.log(s)  # -inf at sigma = 1, +inf at sigma = 0
        h = np.diff(lam)
        # Second-order weight h_i / (2 h_{i-1}) for the inner steps: finite h_i there, and 0 when h_{i-1} = inf.
        self._weight = np.zeros(len(h))
        self._weight[1:-1] = h[1:-1] / (2.0 * h[:-2])
        self._ratio = s[1:] / s[:-1]
        self._history: tuple[int, torch.Tensor] | None = None  # (step index, x0 of that step)

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        dtype, sigmas = self._prepare(i, x)
        xc = x.to(dtype)
        x0 = xc - float(sigmas[i]) * v.to(dtype)
        d = x0
        # History counts only if it is this edit's previous step: a repeated or out-of-order call stays first order.
        if self._history is not None and self._history[0] == i - 1 and self._weight[i] != 0.0:
            d = x0 + float(self._weight[i]) * (x0 - self._history[1])
        ratio = float(self._ratio[i])
        self._history = None if ratio == 0.0 else (i, x0)  # the last step needs no successor: free the latents
        out = d if ratio == 0.0 else ratio * xc + (1.0 - ratio) * d
        return out.to(x.dtype)


SOLVERS = {"euler": EulerSolver, "dpmpp-2m": DPMSolverPP2M}


def make_solver(name: str) -> Solver:
    """A fresh solver ``name``.

    Args:
        name: a key of ``SOLVERS`` (``euler`` or ``dpmpp-2m``).

    Returns:
        A solver; call ``reset(sigmas)`` before stepping.

    Raises:
        InputError: unknown name.
    """
    if name not in SOLVERS:
        raise InputError(f"solver '{name}' is unknown, expected one of {', '.join(SOLVERS)}: pick one (--scheduler)")
    return SOLVERS[name]()
