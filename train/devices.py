"""The device and the precision a training or evaluation run computes in (--device, --precision)."""
from __future__ import annotations

import torch


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """--device: 'auto' is CUDA (one GPU per torchrun process) when available, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype or None, dtype of the frozen weights) for a --precision value."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp32":
        return None, torch.float32
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    return dtype, dtype
