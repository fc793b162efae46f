"""Image metrics of samples against targets and conditions, per image, images [B, C, H, W] in [0, 1].

- `psnr`, `ssim`: restoration-style fidelity to the target;
- `edge_correlation`: how much of the condition's structure is in the sample;
- dental (`dental_metrics`), with the teeth and gum masks of the segmentation map:
  - `masked_psnr` over the teeth: fidelity where it matters;
  - `boundary_f1`: is the tooth/gum boundary of the segmentation map an edge of the sample,
    sharp and in place? Edges are pixels whose Sobel gradient (per pixel, largest over RGB)
    is at least EDGE_THRESHOLD; a boundary pixel is found when an edge lies within
    BOUNDARY_TOLERANCE pixels of it (Chebyshev distance, a (2t+1)^2 square) and an edge
    is correct when it lies that close to the boundary. Only edges within 3x the tolerance
    of the boundary are judged, so tooth outlines against the background and texture
    elsewhere do not count. F1 = 2PR / (P + R); a sample whose only edges are the boundary
    scores 1, a blurred boundary (wide band of weak gradients) or a doubled one less;
  - `hf_energy_ratio`: spectral energy of the luminance above HF_CUTOFF cycles/pixel,
    sample / target: 1 = as much fine detail as the target, < 1 over-smoothed, > 1 noisy.

LPIPS is not computed: the `lpips` package ships only its linear heads and downloads the
AlexNet/VGG backbone weights from download.pytorch.org on first use, which an offline
machine cannot do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BOUNDARY_TOLERANCE = 2  # pixels
EDGE_THRESHOLD = 0.1  # Sobel gradient / 8, i.e. a step of 0.2 between neighbouring pixels
HF_CUTOFF = 0.25  # cycles per pixel (half the Nyquist frequency): detail finer than 4 pixels


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


def masked_psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image over the pixels where `mask` [B, H, W] is true (all channels); NaN for an
    empty mask, capped at 100 dB for identical pixels."""
    m = mask.to(torch.float32)[:, None]
    squared = (a.float() - b.float()).pow(2) * m
    count = m.flatten(1).sum(1) * a.shape[1]
    mse = squared.flatten(1).sum(1) / count.clamp_min(1.0)
    value = (10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)
    return torch.where(count > 0, value, torch.full_like(value, math.nan))


def region_boundary(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pixels [B, H, W] of region `a` with a 4-neighbour in region `b` and of `b` with one in `a`."""
    def touches(mask: torch.Tensor) -> torch.Tensor:  # pixels with a 4-neighbour in `mask`
        padded = F.pad(mask.float()[:, None], (1, 1, 1, 1))
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], device=mask.device)
        return F.conv2d(padded, kernel[None, None])[:, 0] > 0
    return (a & touches(b)) | (b & touches(a))


def edge_map(images: torch.Tensor, threshold: float = EDGE_THRESHOLD) -> torch.Tensor:
    """Pixels [B, H, W] whose Sobel gradient / 8 (largest over the channels) is >= threshold."""
    b, c, h, w = images.shape
    channels = F.pad(images.float().reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device) / 8.0
    gx = F.conv2d(channels, kx[None, None])
    gy = F.conv2d(channels, kx.t()[None, None])
    magnitude = (gx.pow(2) + gy.pow(2)).sqrt().reshape(b, c, h, w).amax(1)
    return magnitude >= threshold


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels within `radius` (Chebyshev distance) of a true pixel of `mask` [B, H, W]."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask.float()[:, None], 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def boundary_f1(images: torch.Tensor, boundary: torch.Tensor, tolerance: int = BOUNDARY_TOLERANCE,
                threshold: float = EDGE_THRESHOLD) -> torch.Tensor:
    """F1 per image of the edges of `images` against `boundary` [B, H, W] (see the module docstring);
    NaN where the boundary is empty."""
    edges = edge_map(images, threshold)
    judged = edges & _dilate(boundary, 3 * tolerance)
    correct = judged & _dilate(boundary, tolerance)
    found = boundary & _dilate(edges, tolerance)
    precision = correct.flatten(1).sum(1) / judged.flatten(1).sum(1).clamp_min(1)
    recall = found.flatten(1).sum(1) / boundary.flatten(1).sum(1).clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return torch.where(boundary.flatten(1).any(1), f1, torch.full_like(f1, math.nan))


def _luminance(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images[:, 0].float()
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device)
    return (images.float() * weights[None, :, None, None]).sum(1)


def high_frequency_energy(images: torch.Tensor, cutoff: float = HF_CUTOFF) -> torch.Tensor:
    """Spectral energy per image of the luminance at frequencies above `cutoff` cycles/pixel."""
    gray = _luminance(images)
    h, w = gray.shape[-2:]
    spectrum = torch.fft.rfft2(gray - gray.mean(dim=(-2, -1), keepdim=True), norm="ortho").abs().pow(2)
    fy = torch.fft.fftfreq(h, device=gray.device)[:, None]
    fx = torch.fft.rfftfreq(w, device=gray.device)[None, :]
    high = (fy.pow(2) + fx.pow(2)).sqrt() > cutoff
    return (spectrum * high).flatten(1).sum(1)


def hf_energy_ratio(samples: torch.Tensor, targets: torch.Tensor, cutoff: float = HF_CUTOFF) -> torch.Tensor:
    """High-frequency energy of each sample over that of its target; NaN for a target without any."""
    target_energy = high_frequency_energy(targets, cutoff)
    ratio = high_frequency_energy(samples, cutoff) / target_energy.clamp_min(1e-20)
    return torch.where(target_energy > 0, ratio, torch.full_like(ratio, math.nan))


def dental_metrics(samples: torch.Tensor, targets: torch.Tensor, teeth: torch.Tensor | None = None,
                   gum: torch.Tensor | None = None, tolerance: int = BOUNDARY_TOLERANCE,
                   threshold: float = EDGE_THRESHOLD, cutoff: float = HF_CUTOFF) -> dict[str, torch.Tensor]:
    """Per image: ssim, psnr, hf_energy_ratio and, with the teeth and gum masks [B, H, W] of the
    segmentation map, boundary_f1 (tooth/gum boundary) and teeth_psnr."""
    metrics = {"ssim": ssim(samples, targets), "psnr": psnr(samples, targets),
               "hf_energy_ratio": hf_energy_ratio(samples, targets, cutoff)}
    if teeth is not None and gum is not None:
        metrics["boundary_f1"] = boundary_f1(samples, region_boundary(teeth, gum), tolerance, threshold)
        metrics["teeth_psnr"] = masked_psnr(samples, targets, teeth)
    return metrics
