"""The `Backbone` of the bundled demo and the tests: the miniature models of `tiny_models.py`.

Public API (stable; the demo builds, saves and loads it, the trainer trains on it):

- `TinyBackbone(unet, autoencoder, text_encoder, controlnet, latent_scale=1.0, device="cpu",
  identity="tiny")`: wraps already-built models (all frozen and put in eval mode here).
- `TinyBackbone.random(seed=0, config=TINY_CONFIG, device="cpu")`: random weights, for tests.
- `TinyBackbone.load(folder, device="cpu", base_path=None)` / `.save(folder)`: a weights folder
  holding `tiny_config.json`, `unet.safetensors`, `autoencoder.safetensors`,
  `text_encoder.safetensors` and `base.safetensors` (the CtrLoRA base in the official layout,
  loadable with `ctrlora_core.formats.load_base(path, num_heads=config.num_heads)`).
- The `Backbone` protocol (`train/backbones/backbone.py`): `encode_moments`, `encode_text`,
  `predict_noise`, `decode`, `latent_scale`, `controlnet`, `device`; plus `identity` (a string
  naming the weights, part of the latent-cache key), `set_gradient_checkpointing(flag)`,
  `compile_unet()` and `release_encoders()` (autoencoder and text encoder to the CPU once the
  caches are built).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch
from safetensors.torch import load_file

from ctrlora_core.config import ControlNetConfig
from ctrlora_core.controlnet import CtrLoRAControlNet
from ctrlora_core.files import file_stamp, write_json
from ctrlora_core.formats import CONTROL_PREFIX, load_base, save_safetensors
from ctrlora_core.random_weights import randomize_, random_base
from train.backbones.tiny_models import TINY_CONFIG, TinyAutoencoder, TinyTextEncoder, TinyUNet

CONFIG_FILE = "tiny_config.json"
WEIGHT_FILES = {"unet": "unet.safetensors", "autoencoder": "autoencoder.safetensors",
                "text_encoder": "text_encoder.safetensors"}
BASE_FILE = "base.safetensors"


class TinyBackbone:
    """Frozen miniature UNet + autoencoder + text encoder and a CtrLoRA Base ControlNet."""

    def __init__(self, unet: TinyUNet, autoencoder: TinyAutoencoder, text_encoder: TinyTextEncoder,
                 controlnet: CtrLoRAControlNet, latent_scale: float = 1.0, device: torch.device | str = "cpu",
                 identity: str = "tiny"):
        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.autoencoder = autoencoder.to(self.device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.controlnet = controlnet.to(self.device).eval().requires_grad_(False)
        self.latent_scale = float(latent_scale)
        self.identity = identity

    @classmethod
    def random(cls, seed: int = 0, config: ControlNetConfig = TINY_CONFIG,
               device: torch.device | str = "cpu") -> "TinyBackbone":
        """Random weights (deterministic in `seed`); the base's zero convs are random too, so residuals are non-zero."""
        generator = torch.Generator().manual_seed(seed)
        unet = TinyUNet(config)
        autoencoder = TinyAutoencoder()
        text_encoder = TinyTextEncoder(width=config.context_dim)
        for model in (unet, autoencoder, text_encoder):
            randomize_(model, generator)
        return cls(unet, autoencoder, text_encoder, random_base(config, seed + 1), device=device,
                   identity=f"tiny-random-{config}-seed{seed}")

    @classmethod
    def load(cls, folder: str | os.PathLike, device: torch.device | str = "cpu",
             base_path: str | os.PathLike | None = None) -> "TinyBackbone":
        """Load a weights folder written by `save`; `base_path` overrides the folder's base.safetensors."""
        folder = os.fspath(folder)
        config_path = os.path.join(folder, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path}: missing; expected a tiny weights folder written by "
                                    "TinyBackbone.save")
        with open(config_path, encoding="utf-8") as f:
            settings = json.load(f)
        unet_config = ControlNetConfig(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in settings["unet"].items()})
        models = {
            "unet": TinyUNet(unet_config),
            "autoencoder": TinyAutoencoder(**settings["autoencoder"]),
            "text_encoder": TinyTextEncoder(**settings["text_encoder"]),
        }
        for name, model in models.items():
            model.load_state_dict(load_file(os.path.join(folder, WEIGHT_FILES[name])))
        base_path = os.fspath(base_path) if base_path is not None else os.path.join(folder, BASE_FILE)
        controlnet = load_base(base_path, num_heads=unet_config.num_heads)
        stamps = [file_stamp(os.path.join(folder, f)) for f in (CONFIG_FILE, *WEIGHT_FILES.values())]
        identity = f"tiny:{stamps}:base={file_stamp(base_path)}"
        return cls(models["unet"], models["autoencoder"], models["text_encoder"], controlnet,
                   latent_scale=settings["latent_scale"], device=device, identity=identity)

    def save(self, folder: str | os.PathLike) -> None:
        """Write the weights folder (every file atomically)."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        settings = {"unet": self.unet.config.to_dict(), "autoencoder": self.autoencoder.settings,
                    "text_encoder": self.text_encoder.settings, "latent_scale": self.latent_scale}
        models = {"unet": self.unet, "autoencoder": self.autoencoder, "text_encoder": self.text_encoder}
        for name, model in models.items():
            save_safetensors(model.state_dict(), os.path.join(folder, WEIGHT_FILES[name]))
        save_safetensors({CONTROL_PREFIX + k: v for k, v in self.controlnet.state_dict().items()},
                         os.path.join(folder, BASE_FILE))
        write_json(os.path.join(folder, CONFIG_FILE), settings)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute UNet blocks during backward (less memory, more compute)."""
        self.unet.gradient_checkpointing = enabled  # before compile_unet()

    def compile_unet(self) -> None:
        """torch.compile the UNet (the largest network; the ControlNet with per-step adapters stays eager)."""
        self.unet = torch.compile(self.unet)

    def release_encoders(self) -> None:
        """Move the autoencoder and text encoder to the CPU (the training loop only needs UNet and base)."""
        self.autoencoder.cpu()
        self.text_encoder.cpu()

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.autoencoder.parameters()).device
        return self.autoencoder.encode_moments(images.to(device, torch.float32)).float()

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder.encode(list(prompts)).float()

    def predict_noise(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                      control: list[torch.Tensor] | None) -> torch.Tensor:
        return self.unet(x_t, timesteps, context, control)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        device = next(self.autoencoder.parameters()).device
        images = self.autoencoder.decode(latents.to(device, torch.float32) / self.latent_scale)
        return images.clamp(-1.0, 1.0).to(latents.device)
