"""Fidelity of an edit against a reference edit: PSNR and SSIM of the decoded images, cosine of the final latents."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # identical images: PSNR is infinite; reported as this cap so JSON stays finite


def image_tensor(image: Any) -> torch.Tensor:
    """A PIL image (or [H, W, 3] uint8 array) as float64 [3, H, W] in [0, 1]."""
    array = np.asarray(image, dtype=np.float64) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of two [C, H, W] images in [0, 1]; ``PSNR_CAP_DB`` when they are equal."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    if mse <= 0:
        return PSNR_CAP_DB
    return min(10.0 * math.log10(1.0 / mse), PSNR_CAP_DB)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()  # [size]


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) of two [C, H, W] images in [0, 1], averaged over channels.

    Gaussian window of 11 pixels (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1; only windows that lie inside the
    image count (no padding). Images smaller than the window use a window of their smaller side.
    """
    a, b = a.double()[None], b.double()[None]  # [1, C, H, W]
    channels = a.shape[1]
    size = min(window, a.shape[2], a.shape[3])
    g = _gaussian_window(size, sigma)
    kernel_h = g.view(1, 1, size, 1).repeat(channels, 1, 1, 1)
    kernel_w = g.view(1, 1, 1, size).repeat(channels, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region only
        return F.conv2d(F.conv2d(x, kernel_h, groups=channels), kernel_w, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean().item()


def latent_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two latent tensors, flattened."""
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def fidelity(image: Any, latents: torch.Tensor, ref_image: Any, ref_latents: torch.Tensor) -> dict[str, float]:
    """PSNR (dB), SSIM and latent cosine of one edit against the reference edit."""
    a, b = image_tensor(image), image_tensor(ref_image)
    return {"psnr_db": psnr(a, b), "ssim": ssim(a, b), "latent_cosine": latent_cosine(latents, ref_latents)}
