"""Random-weight CtrLoRA files in the exact official layouts, for tests, benches and demos.

No real weights can be downloaded where this project is tested, so tests build files
with the real architectures (full-size SD1.5 or smaller configs of the same structure)
and random values. The values are scaled so activations stay finite and every residual
is non-zero; they mean nothing.
"""
from __future__ import annotations

import math
import os

import torch

from .adapters import CtrLoRAAdapter
from .config import ControlNetConfig
from .controlnet import CtrLoRAControlNet
from .formats import CONTROL_PREFIX, save_adapter, save_safetensors

SMALL_CONFIG = ControlNetConfig(model_channels=64, channel_mult=(1, 1, 1, 1), context_dim=32)


def randomize_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter: weights ~ N(0, 1/fan_in), norm scales ~ 1, biases small."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))


def random_base(config: ControlNetConfig = SMALL_CONFIG, seed: int = 0) -> CtrLoRAControlNet:
    """A Base ControlNet of `config` with random weights (zero convs random too)."""
    generator = torch.Generator().manual_seed(seed)
    model = CtrLoRAControlNet(config)
    randomize_(model, generator)
    return model.eval().requires_grad_(False)


def random_adapter(model: CtrLoRAControlNet, rank: int, seed: int, name: str = "random") -> CtrLoRAAdapter:
    """An adapter for `model` whose LoRA up/down, zero convs and norms are all random and non-zero."""
    generator = torch.Generator().manual_seed(seed)
    adapter = CtrLoRAAdapter.fresh(model, rank, generator, name=name)
    for key, value in adapter.tensors.items():
        if key.endswith("lora_layer.up.weight"):
            value.copy_(torch.randn(value.shape, generator=generator) / math.sqrt(rank))
        elif key.endswith("lora_layer.down.weight"):
            value.copy_(torch.randn(value.shape, generator=generator) / math.sqrt(value.shape[1]))
        else:
            value.mul_(1.0 + 0.2 * torch.randn(value.shape, generator=generator))
    return adapter


def save_random_base(path: str | os.PathLike, model: CtrLoRAControlNet, leftover_lora_rank: int = 8,
                     seed: int = 1) -> None:
    """Save `model` as an official base file: `control_model.` prefix + leftover pretraining LoRA tensors."""
    tensors = {CONTROL_PREFIX + k: v for k, v in model.state_dict().items()}
    leftover = random_adapter(model, leftover_lora_rank, seed)
    tensors.update({CONTROL_PREFIX + k: v for k, v in leftover.tensors.items() if "lora_layer" in k})
    save_safetensors(tensors, path)


def write_random_files(folder: str | os.PathLike, config: ControlNetConfig = SMALL_CONFIG, rank: int = 8,
                       lora_names: tuple[str, ...] = ("lora_a", "lora_b"), seed: int = 0) -> dict[str, str]:
    """Write base.safetensors and one random LoRA per name into `folder`; return name -> path."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    model = random_base(config, seed)
    paths = {"base": os.path.join(folder, "base.safetensors")}
    save_random_base(paths["base"], model)
    for i, name in enumerate(lora_names):
        paths[name] = os.path.join(folder, f"{name}.safetensors")
        save_adapter(random_adapter(model, rank, seed + 100 + i, name), paths[name], {"condition": name})
    return paths
