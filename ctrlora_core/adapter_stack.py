"""The run-time form of N condition adapters: their tensors stacked along a new first axis.

A `CtrLoRAAdapter` keeps tensors in the official file layout (one tensor per key). For a
forward pass the adapted layers need, per layer, the N adapters' tensors side by side:

- `lora[linear]`  = (down_t [N, in, R], up_t [N, R, out]), strength folded into `up_t`;
  adapters of different rank are zero-padded to the largest rank R (exact);
- `sets[module]`  = (weight [N, ...], bias [N, ...]) for zero convs and attention norms;
- `weights`       = the per-condition weights of the residual sum (official `lora_weights`).

Stacking uses `torch.stack`, so a stack built from trainable parameters passes gradients
back to them (the trainer builds one per step; inference builds one and reuses it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .adapters import CtrLoRAAdapter


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

    @classmethod
    def build(
        cls,
        adapters: Sequence["CtrLoRAAdapter"],
        weights: Sequence[float] | None = None,
        lora_strengths: Sequence[float] | None = None,
    ) -> "AdapterStack":
        """Stack `adapters`; `weights` default to 1.0 each, `lora_strengths` to 1.0 each."""
        if not adapters:
            raise ValueError("AdapterStack.build needs at least one adapter")
        n = len(adapters)
        weights = [1.0] * n if weights is None else list(weights)
        strengths = [1.0] * n if lora_strengths is None else list(lora_strengths)
        if len(weights) != n or len(strengths) != n:
            raise ValueError(f"{n} adapters but {len(weights)} weights and {len(strengths)} strengths")
        first = adapters[0]
        for other in adapters[1:]:
            if other.layout_signature() != first.layout_signature():
                raise ValueError(
                    f"adapters {first.name!r} and {other.name!r} do not fit the same base model "
                    "(different layers or shapes)")
        rank = max(a.rank for a in adapters)
        lora = {}
        for linear in first.lora_modules():
            downs, ups = [], []
            for adapter, s in zip(adapters, strengths):
                down, up = adapter.lora_pair(linear)  # [r, in], [out, r]
                pad = rank - down.shape[0]
                if pad:
                    down = torch.cat([down, down.new_zeros(pad, down.shape[1])], 0)
                    up = torch.cat([up, up.new_zeros(up.shape[0], pad)], 1)
                downs.append(down.t())
                ups.append(up.t() * s)
            lora[linear] = (torch.stack(downs), torch.stack(ups))
        sets = {}
        for module in first.set_modules():
            pairs = [adapter.set_pair(module) for adapter in adapters]
            sets[module] = (torch.stack([w for w, _ in pairs]), torch.stack([b for _, b in pairs]))
        return cls(lora=lora, sets=sets, weights=torch.tensor(weights, dtype=torch.float32))

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
