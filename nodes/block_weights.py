"""Per-block control weights of Apply CtrLoRA (pure torch; no ComfyUI needed).

- constant:   every residual x 1;
- soft:       residual i of n x 0.825^(n-1-i) (ControlNet's "soft injection" / guess-mode scales:
              deep blocks count most, the first ones about 0.1);
- resolution: residual i x (latent height / its height), the ControlNet paper's CFG resolution
              weighting w_i = 64 / h_i at 512 px, written for any size. The paper uses it with
              the control on the conditional pass only (Apply CtrLoRA's apply_to_uncond off).
"""
from __future__ import annotations

from typing import Sequence

import torch

BLOCK_WEIGHTINGS = ("constant", "soft", "resolution")
SOFT_DECAY = 0.825


def block_multipliers(mode: str, residuals: Sequence[torch.Tensor], latent_height: int) -> list[float]:
    """One factor per residual (official order: zero convs, then middle) for weighting `mode`."""
    n = len(residuals)
    if mode == "soft":
        return [SOFT_DECAY ** (n - 1 - i) for i in range(n)]
    if mode == "resolution":
        return [latent_height / r.shape[-2] for r in residuals]
    if mode == "constant":
        return [1.0] * n
    raise ValueError(f"block weighting {mode!r}: expected one of {', '.join(BLOCK_WEIGHTINGS)}")
