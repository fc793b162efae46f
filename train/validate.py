"""Sampling held-out pairs with a condition adapter, image metrics, and the validation grid PNG.

- `sample_latents`: DDIM (eta 0) with classifier-free guidance, the official inference
  recipe (spec §6): every step runs the Base ControlNet with the adapter and the UNet,
  for the prompt and for the empty prompt (the uncond pass keeps the condition).
- `psnr`, `ssim`, `edge_correlation`: per-image metrics of images in [0, 1].
- `save_grid`: one row per pair: condition | sample | target.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ctrlora_core.adapter_stack import AdapterStack
from ctrlora_core.adapters import CtrLoRAAdapter
from ctrlora_core.schedule import NoiseSchedule, classifier_free_guidance
from train.backbone import Backbone


def sample_latents(backbone: Backbone, adapter: CtrLoRAAdapter, hints: torch.Tensor, context: torch.Tensor,
                   uncond: torch.Tensor, steps: int = 20, cfg: float = 7.5, seed: int = 0,
                   autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Latents [B, C, h, w] sampled for condition latents `hints` [B, C, h, w] and text `context` [B, L, D].

    `uncond` is the empty-prompt embedding [1, L, D]; the start noise comes from `seed`.
    `autocast_dtype`: run the networks under torch.autocast in this dtype (None: as they are).
    """
    device = backbone.device
    stack = AdapterStack.build([adapter])
    hints, context = hints.to(device), context.to(device)
    uncond = uncond.to(device).expand_as(context)
    schedule = NoiseSchedule()

    def eps_with(text: torch.Tensor):
        def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
                control = backbone.controlnet(hints, t, text, adapters=stack)
                return backbone.predict_noise(x_t, t, text, control).float()
        return eps

    eps_fn = eps_with(context) if cfg == 1.0 else classifier_free_guidance(eps_with(context), eps_with(uncond), cfg)
    generator = torch.Generator(device=device).manual_seed(seed)
    return schedule.ddim_sample(eps_fn, tuple(hints.shape), steps, generator=generator, device=device)


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


def save_grid(path: str | os.PathLike, conditions: torch.Tensor, samples: torch.Tensor,
              targets: torch.Tensor) -> None:
    """PNG with one row per pair: condition | sample | target (all [B, 3, H, W] in [0, 1])."""
    rows = torch.cat([conditions, samples, targets], dim=3)  # side by side
    grid = torch.cat(list(rows), dim=1)  # rows stacked: [3, B*H, 3*W]
    pixels = (grid.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp.png")
    Image.fromarray(pixels).save(tmp)
    os.replace(tmp, path)
