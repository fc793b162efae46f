"""Image metrics of samples against targets and conditions, per image, images [B, C, H, W] in [0, 1].

- `psnr`, `ssim`: restoration-style fidelity to the target;
- `edge_correlation`: how much of the condition's structure is in the sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of [B, C, H, W] images in [0, 1] (capped at 100 dB for identical images)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM per image (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), channel mean.

    Images [B, C, H, W] in [0, 1]; the window is cropped for images smaller than 11 px.
    """
    a, b = a.float(), b.float()
    channels = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    window = _gaussian_window(size).to(a.device).expand(channels, 1, size, size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.pow(2)
    var_b = blur(b * b) - mu_b.pow(2)
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(1)


def _edge_magnitude(images: torch.Tensor) -> torch.Tensor:
    gray = F.pad(images.float().mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate")  # no edges at the border
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    gx = F.conv2d(gray, kx[None, None])
    gy = F.conv2d(gray, kx.t()[None, None])
    return (gx.pow(2) + gy.pow(2)).sqrt().flatten(1)


def edge_correlation(samples: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
    """Condition fidelity: Pearson correlation of the Sobel edge magnitudes of sample and condition.

    1 = the sample has its edges exactly where the condition has them; ~0 = unrelated.
    """
    a, b = _edge_magnitude(samples), _edge_magnitude(conditions)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
