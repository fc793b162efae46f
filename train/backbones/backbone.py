"""What the trainer needs from a diffusion model, independent of where the model comes from.

Two implementations exist:
- `train/backbones/comfy.py`: a real SD1.5-family checkpoint loaded through ComfyUI
  (UNet, VAE, CLIP) + an official CtrLoRA base;
- `train/backbones/tiny.py`: the miniature models of the bundled demo (same classes from
  ctrlora_core at small sizes, a small autoencoder and text encoder).

The training loop only talks to this interface, so both run the same code.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ctrlora_core.controlnet import CtrLoRAControlNet


class Backbone(Protocol):
    """A frozen SD-style latent diffusion model plus a frozen CtrLoRA Base ControlNet."""

    #: multiplies VAE posterior samples to get diffusion latents (SD1.5: 0.18215)
    latent_scale: float
    #: the frozen Base ControlNet the condition adapters are trained on
    controlnet: CtrLoRAControlNet
    #: where compute happens
    device: torch.device
    #: names the frozen weights (paths, sizes, mtimes); part of the latent-cache key
    identity: str

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """VAE posterior moments [B, 8, h, w] (mean and logvar, unscaled) of images [B, 3, H, W].

        The caller decides the range: targets go in as [-1, 1]; conditions go in as
        [0, 1], the official CtrLoRA quirk (spec §1).
        """

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings [N, L, D] for N prompts ("" is the unconditional prompt)."""

    def predict_noise(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                      control: list[torch.Tensor] | None) -> torch.Tensor:
        """UNet eps prediction; `control` = the ControlNet residuals in official order.

        Gradients must flow back into `control` (the UNet weights stay frozen).
        """

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] from scaled latents."""

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute UNet (and ControlNet) blocks in the backward pass to save memory."""

    def compile_unet(self) -> None:
        """Wrap the UNet forward in torch.compile (call after set_gradient_checkpointing)."""

    def release_encoders(self) -> None:
        """Move the VAE encoder and text encoder off the accelerator once everything is cached."""


def sample_latent(moments: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A scaled sample of the diagonal Gaussian posterior given by `moments` (mean, logvar)."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * scale
