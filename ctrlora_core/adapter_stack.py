"""The run-time form of N condition adapters: their tensors stacked along a new first axis.

A `CtrLoRAAdapter` keeps tensors in the official file layout (one tensor per key). For a
forward pass the adapted layers need, per layer, the N adapters' tensors side by side:

- `lora[linear]`  = (down_t [N, in, R], up_t [N, R, out]), strength folded into `up_t`;
  adapters of different rank are zero-padded to the largest rank R (exact);
- `sets[module]`  = (weight [N, ...], bias [N, ...]) for zero convs and attention norms;
- `weights`       = the per-condition weights of the residual sum (official `lora_weights`).

`ctrlora_core.adapters.stack_adapters` builds one from adapters with `torch.stack`, so a stack
built from trainable parameters passes gradients back to them (the trainer builds one per
step; inference builds one and reuses it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AdapterStack:
    """N adapters prepared for one batched forward pass."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]]
    weights: torch.Tensor  # [N] float32, condition weights of the residual sum
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def count(self) -> int:
        return int(self.weights.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "AdapterStack":
        """This stack on `device` in `dtype` (cached; returns self when nothing changes)."""
        device = torch.device(device)
        sample = next(iter(self.lora.values()))[0]
        if sample.device == device and sample.dtype == dtype:
            return self
        key = (device, dtype)
        if key not in self._cache:
            def move(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
                return pair[0].to(device, dtype), pair[1].to(device, dtype)

            self._cache[key] = AdapterStack(
                lora={k: move(v) for k, v in self.lora.items()},
                sets={k: move(v) for k, v in self.sets.items()},
                weights=self.weights,
            )
        return self._cache[key]

    def numel(self) -> int:
        """Number of stacked adapter values held (padding included)."""
        pairs = list(self.lora.values()) + list(self.sets.values())
        return sum(a.numel() + b.numel() for a, b in pairs)
