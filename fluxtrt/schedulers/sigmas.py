"""Sigma schedules for flow matching, x_sigma = (1 - sigma) x0 + sigma noise.

Every schedule returns float64 sigmas of length steps + 1, decreasing from 1 and ending with 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fluxtrt.errors import InputError

KARRAS_RHO = 7.0
# log-snr end points (DESIGN 3): after sigma = 1 the grid runs from lambda = -log 99 to lambda = log 49.
LOG_SNR_SIGMA_MAX = 0.99
LOG_SNR_SIGMA_MIN = 0.02


def flux_mu(target_tokens: int, config: Mapping[str, float]) -> float:
    """FLUX's time-shift exponent, linear in the target's packed tokens (256 -> 0.5, 4096 -> 1.15).

    Kontext's reference tokens do not count: mu follows the image being generated.

    Args:
        target_tokens: packed latent tokens of the target image, (H // 16) * (W // 16).
        config: the scheduler config's shift parameters; missing keys take FLUX's defaults.

    Returns:
        mu, the log of the time-shift factor.
    """
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    shift_lo, shift_hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (shift_hi - shift_lo) / (hi - lo)
    return target_tokens * slope + (shift_lo - slope * lo)


def flux_shift_sigmas(steps: int, mu: float) -> np.ndarray:
    """diffusers' FLUX default: linspace(1, 1/N, N) time-shifted by exp(mu), then a final 0.

    Computed in float32 as FlowMatchEulerDiscreteScheduler.set_timesteps does, so the float32 sigmas the solvers
    use are bit-identical to diffusers' and Euler reproduces its trajectory exactly.
    """
    t = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    e = np.float32(math.exp(mu))
    shifted = e / (e + (np.float32(1.0) / t - np.float32(1.0)))
    return np.append(shifted.astype(np.float64), 0.0)


def karras_sigmas(steps: int, mu: float) -> np.ndarray:
    """Karras et al. (2022) rho = 7 spacing between the first and last nonzero flux-shift sigma, then a final 0.

    This is diffusers' FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True): it converts the shifted sigmas
    with sigma_max = shifted[0] (= 1) and sigma_min = shifted[-1], keeping N values, in float64.
    """
    shifted = flux_shift_sigmas(steps, mu)[:-1]
    hi, lo = shifted[0] ** (1.0 / KARRAS_RHO), shifted[-1] ** (1.0 / KARRAS_RHO)
    ramp = np.linspace(0.0, 1.0, steps, dtype=np.float64)
    return np.append((hi + ramp * (lo - hi)) ** KARRAS_RHO, 0.0)


def log_snr_sigmas(
    steps: int, mu: float, sigma_max: float = LOG_SNR_SIGMA_MAX, sigma_min: float = LOG_SNR_SIGMA_MIN
) -> np.ndarray:
    """1, then steps - 1 sigmas evenly spaced in log-SNR from sigma_max down to sigma_min, then a final 0.

    With alpha = 1 - sigma, lambda = log(alpha / sigma), so sigma = 1 / (1 + exp(lambda)). The inner sigmas have
    lambda_k = lambda(sigma_min) - (steps - 1 - k) h for k = 1 .. steps - 1, h = (lambda(sigma_min) -
    lambda(sigma_max)) / (steps - 2): the time-uniform log-SNR grid of the DPM-Solver papers, led by sigma = 1 (the
    pipeline's pure noise) and ended by 0. Two steps give [1, sigma_min, 0], one step [1, 0]. At the defaults the
    grid runs from lambda = -log 99 to log 49 whatever the step count; 14 steps give h = log(99 * 49) / 12 = 0.7073.

    It does not follow FLUX's resolution shift: sigma_min bounds the error of the last, first-order step (it lands
    on the data prediction at sigma_min), which depends on how narrow the data are, not on the token count. DESIGN 3
    has the measurements behind both end points.

    Args:
        steps: model calls per edit, >= 1.
        mu: FLUX's time-shift exponent; accepted like every schedule's, and unused.
        sigma_max: the first sigma after 1.
        sigma_min: the last nonzero sigma.

    Returns:
        float64 array of steps + 1 sigmas, strictly decreasing from 1 to a final 0.

    Raises:
        InputError: end points not within 0 < sigma_min < sigma_max < 1.
    """
    del mu
    if not 0.0 < sigma_min < sigma_max < 1.0:
        raise InputError(
            f"log-snr end points are sigma_max={sigma_max}, sigma_min={sigma_min}, expected 0 < sigma_min < "
            f"sigma_max < 1: keep the defaults ({LOG_SNR_SIGMA_MAX}, {LOG_SNR_SIGMA_MIN}) or pick values inside (0, 1)"
        )
    lam_max, lam_min = math.log((1.0 - sigma_max) / sigma_max), math.log((1.0 - sigma_min) / sigma_min)
    lam = np.linspace(lam_min, lam_max, steps - 1, dtype=np.float64)[::-1]  # counted back from lambda_min
    return np.concatenate(([1.0], 1.0 / (1.0 + np.exp(lam)), [0.0]))


SCHEDULES = {"log-snr": log_snr_sigmas, "flux-shift": flux_shift_sigmas, "karras": karras_sigmas}


def sigma_schedule(name: str, steps: int, mu: float) -> np.ndarray:
    """Sigmas of schedule ``name`` for ``steps`` model calls at shift ``mu``.

    Args:
        name: a key of ``SCHEDULES`` (``log-snr``, ``flux-shift`` or ``karras``).
        steps: model calls per edit, >= 1.
        mu: FLUX's time-shift exponent, from ``flux_mu``.

    Returns:
        float64 array of steps + 1 sigmas, strictly decreasing from 1 to a final 0.

    Raises:
        InputError: unknown schedule, steps not an integer >= 1, or mu not finite.
    """
    if name not in SCHEDULES:
        raise InputError(
            f"sigma schedule '{name}' is unknown, expected one of {', '.join(SCHEDULES)}: pick one of them"
        )
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"steps is {steps!r}, expected an integer >= 1: pass a positive step count (--steps)")
    if not math.isfinite(mu):
        raise InputError(f"mu is {mu}, expected a finite number: compute it with flux_mu(target_tokens, config)")
    return SCHEDULES[name](int(steps), float(mu))


def validate_sigmas(sigmas: object) -> np.ndarray:
    """Check that explicitly given sigmas form a schedule a solver can integrate.

    Args:
        sigmas: 1-D sequence of at least two noise levels.

    Returns:
        The sigmas as a float64 array.

    Raises:
        InputError: not 1-D with >= 2 values, not finite, outside [0, 1], not strictly decreasing or not ending at 0.
    """
    s = np.asarray(sigmas, dtype=np.float64)
    fix = "use sigma_schedule(name, steps, mu) or pass values decreasing from at most 1 to a final 0"
    if s.ndim != 1 or s.size < 2:
        raise InputError(f"sigmas have shape {s.shape}, expected a 1-D array of steps + 1 >= 2 values: {fix}")
    if not np.all(np.isfinite(s)) or s.min() < 0.0 or s.max() > 1.0:
        raise InputError(f"sigmas span [{s.min()}, {s.max()}], expected finite values within [0, 1]: {fix}")
    if np.any(np.diff(s) >= 0.0):
        i = int(np.argmax(np.diff(s) >= 0.0))
        raise InputError(f"sigmas[{i + 1}] = {s[i + 1]} follows {s[i]}, expected strictly decreasing sigmas: {fix}")
    if s[-1] != 0.0:
        raise InputError(f"the last sigma is {s[-1]}, expected 0 (the clean image): {fix}")
    return s
