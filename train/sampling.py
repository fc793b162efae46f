"""Sampling images with a condition adapter, and the grid PNG of samples next to their inputs.

- `sample_latents`: DDIM (eta 0) with classifier-free guidance, the official inference
  recipe (spec §6): every step runs the Base ControlNet with the adapter and the UNet,
  for the prompt and for the empty prompt (the uncond pass keeps the condition);
  (adapter None: the UNet alone, without any ControlNet residuals);
- `sample_images`: the same, decoded to images in [0, 1] (validation, evaluation, demo);
- `save_grid`: one row per pair, images side by side: condition | sample(s) | target.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ctrlora_core.adapters import CtrLoRAAdapter, stack_adapters
from ctrlora_core.files import atomic_write
from ctrlora_core.schedule import NoiseSchedule, classifier_free_guidance
from train.backbones.backbone import Backbone


def sample_latents(backbone: Backbone, adapter: CtrLoRAAdapter | None, hints: torch.Tensor, context: torch.Tensor,
                   uncond: torch.Tensor, steps: int = 20, cfg: float = 7.5, seed: int = 0,
                   autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Latents [B, C, h, w] sampled for condition latents `hints` [B, C, h, w] and text `context` [B, L, D].

    `uncond` is the empty-prompt embedding [1, L, D]; the start noise comes from `seed`.
    `adapter` None samples the UNet alone (no control: `hints` only give the shape).
    `autocast_dtype`: run the networks under torch.autocast in this dtype (None: as they are).
    """
    device = backbone.device
    stack = stack_adapters([adapter]) if adapter is not None else None
    hints, context = hints.to(device), context.to(device)
    uncond = uncond.to(device).expand_as(context)
    schedule = NoiseSchedule()

    def eps_with(text: torch.Tensor):
        def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
                control = backbone.controlnet(hints, t, text, adapters=stack) if stack is not None else None
                return backbone.predict_noise(x_t, t, text, control).float()
        return eps

    eps_fn = eps_with(context) if cfg == 1.0 else classifier_free_guidance(eps_with(context), eps_with(uncond), cfg)
    generator = torch.Generator(device=device).manual_seed(seed)
    return schedule.ddim_sample(eps_fn, tuple(hints.shape), steps, generator=generator, device=device)


def sample_images(backbone: Backbone, adapter: CtrLoRAAdapter | None, hints: torch.Tensor, context: torch.Tensor,
                  uncond: torch.Tensor, steps: int = 20, cfg: float = 7.5, seed: int = 0,
                  autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`sample_latents`, decoded: images [B, 3, H, W] in [0, 1], float32 on the CPU."""
    latents = sample_latents(backbone, adapter, hints, context, uncond, steps, cfg, seed, autocast_dtype)
    return ((backbone.decode(latents).float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def save_grid(path: str | os.PathLike, *columns: torch.Tensor) -> None:
    """PNG with one row per pair and one column per image batch, e.g. condition | sample | target
    (all [B, 3, H, W] in [0, 1])."""
    rows = torch.cat(columns, dim=3)  # side by side
    grid = torch.cat(list(rows), dim=1)  # rows stacked: [3, B*H, 3*W]
    pixels = (grid.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
