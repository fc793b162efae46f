"""Where the trainer's frozen models come from: `open_backbone(--model, --base, ...)`.

- `backbone.py`: the `Backbone` interface the training loop talks to;
- `comfy.py`: a real SD1.5-family checkpoint loaded through ComfyUI + an official base;
- `tiny.py` / `tiny_models.py`: the miniature models of the demo and the tests.
"""
from __future__ import annotations

import os

import torch

from ctrlora_core.errors import CtrLoRAError

from .backbone import Backbone


def open_backbone(model: str, base: str, comfyui: str, device: torch.device, weight_dtype: torch.dtype) -> Backbone:
    """Open --model: 'tiny-random[:SEED]', a tiny weights folder, or an SD checkpoint through ComfyUI."""
    from .tiny import CONFIG_FILE, TinyBackbone

    if model.startswith("tiny-random"):
        seed = int(model.partition(":")[2] or 0)
        return TinyBackbone.random(seed, device=device)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, CONFIG_FILE)):
            raise CtrLoRAError(f"{model}: a folder given as --model must hold miniature weights ({CONFIG_FILE})")
        return TinyBackbone.load(model, device=device, base_path=base or None)
    if not base:
        raise CtrLoRAError("--base is required with an SD checkpoint (the CtrLoRA Base ControlNet file)")
    from .comfy import ComfyBackbone  # imports ComfyUI

    return ComfyBackbone(model, base, comfyui=comfyui or None, device=device, dtype=weight_dtype)
