"""Scripting entry point: control residuals from file paths and plain arrays.

    from ctrlora_core.api import control_residuals
    residuals = control_residuals("base.safetensors", ["depth.safetensors"], [1.0], 1.0,
                                  hints=[latent], timesteps=[999], context=text_embeddings)

This is the reference the ComfyUI nodes and the trainer are tested against.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
import torch

from .adapters import CtrLoRAAdapter, stack_adapters
from .controlnet import CtrLoRAControlNet
from .formats import load_adapter, load_base

ArrayLike = np.ndarray | torch.Tensor | Sequence


@functools.lru_cache(maxsize=2)
def _cached_base(path: str, mtime: float, dtype: torch.dtype, device: str) -> CtrLoRAControlNet:
    return load_base(path, dtype=dtype, device=device)


def _as_tensor(x: ArrayLike, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(device, dtype)


def control_residuals(
    base_path: str | os.PathLike,
    lora_paths: Sequence[str | os.PathLike],
    lora_weights: Sequence[float] | None,
    strength: float,
    hints: Sequence[ArrayLike] | ArrayLike,
    timesteps: ArrayLike,
    context: ArrayLike,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> list[torch.Tensor]:
    """Residuals of the Base ControlNet with condition LoRAs, official order (zero convs, then middle).

    base_path:    CtrLoRA base file (.ckpt or .safetensors).
    lora_paths:   condition LoRA files; empty for the bare base.
    lora_weights: weight of each condition in the residual sum (default 1.0 each).
    strength:     multiplies every residual (the official control_scales).
    hints:        one condition latent [B, 4, h, w] per LoRA (VAE-encoded and scaled by 0.18215);
                  for the bare base a single latent.
    timesteps:    [B] integer diffusion steps 0..999.  context: [B, L, D] text embeddings.
    """
    path = os.fspath(base_path)
    model = _cached_base(path, os.path.getmtime(path), dtype, device)
    if isinstance(hints, (np.ndarray, torch.Tensor)):
        hints = [hints]
    hint_list = [_as_tensor(h, dtype, device) for h in hints]
    t = _as_tensor(timesteps, torch.int64, device).reshape(-1)
    ctx = _as_tensor(context, dtype, device)
    if lora_paths:
        if len(hint_list) != len(lora_paths):
            raise ValueError(f"{len(lora_paths)} LoRA files but {len(hint_list)} hints: give one hint per LoRA")
        adapters: list[CtrLoRAAdapter] = [load_adapter(p, model) for p in lora_paths]
        stack = stack_adapters(adapters, lora_weights)
        hint = torch.cat(hint_list, 0)
    else:
        if len(hint_list) != 1:
            raise ValueError("the bare base takes exactly one hint")
        stack, hint = None, hint_list[0]
    with torch.no_grad():
        outs = model(hint, t, ctx, adapters=stack)
    return [o * strength for o in outs]
