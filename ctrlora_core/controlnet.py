"""The CtrLoRA Base ControlNet: an SD UNet-encoder copy driven by the condition latent.

Differences from a classic ControlNet (spec §1):
- no hint block: the 4-channel VAE latent of the condition image goes straight into
  `input_blocks.0` (the noisy latent is never seen);
- the time embedding and the text context are used as in the UNet;
- outputs are 13 residuals for SD1.5 (zero conv after each input block, then the
  middle block's zero conv), in the official order.

Condition adapters (`AdapterStack`) are applied at forward time, so one copy of the
base weights serves any number of conditions: with N adapters the N condition latents
run as one batch of N*B, and the residuals are summed with the condition weights.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapter_stack import AdapterStack
from .blocks import EmbedSequential, timestep_embedding, unet_encoder
from .config import ControlNetConfig
from .layers import AdapterRuntime, accumulation_dtype, build_ops


class CtrLoRAControlNet(nn.Module):
    """Base ControlNet with forward-time condition adapters."""

    def __init__(self, config: ControlNetConfig, host_ops: Any = None):
        super().__init__()
        self.config = config
        ops = build_ops(host_ops)
        time_embed, input_blocks, middle_block, channels = unet_encoder(ops, config)
        # registration order = the official state-dict order (parameter order seeds the random test weights)
        self.time_embed, self.input_blocks = time_embed, input_blocks
        self.zero_convs = nn.ModuleList([self._zero_conv(ops, ch) for ch in channels])
        self.middle_block, self.middle_block_out = middle_block, self._zero_conv(ops, channels[-1])

        self.runtime = AdapterRuntime()
        for name, module in self.named_modules():
            if hasattr(module, "ctrlora_key"):
                module.ctrlora_key = name
                module.ctrlora_runtime = self.runtime

    @staticmethod
    def _zero_conv(ops: SimpleNamespace, ch: int) -> EmbedSequential:
        return EmbedSequential(ops.AdapterConv2d(ch, ch, 1))

    def lora_module_names(self) -> list[str]:
        """Names of the Linear layers that carry LoRA (every Linear of the ControlNet)."""
        return [n for n, m in self.named_modules() if hasattr(m, "ctrlora_key") and isinstance(m, nn.Linear)]

    def set_module_names(self) -> list[str]:
        """Names of the zero convs and attention norms each adapter replaces."""
        return [n for n, m in self.named_modules() if hasattr(m, "ctrlora_key") and not isinstance(m, nn.Linear)]

    def forward(
        self,
        hint: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        adapters: AdapterStack | None = None,
        gradient_checkpointing: bool = False,
    ) -> list[torch.Tensor]:
        """Return the control residuals (official order: zero convs 0..n-1, then middle).

        hint:      condition latents [N*B, C, h, w], adapter-major when N adapters are given
                   (rows i*B..i*B+B-1 belong to adapter i); [B, C, h, w] otherwise.
        timesteps: [B] diffusion steps (0..999); context: [B, L, D] text embeddings.
        adapters:  condition adapters; the result is sum_i weights[i] * residuals_i.
        """
        n = 1 if adapters is None else adapters.count
        if hint.shape[0] % n:
            raise ValueError(f"hint batch {hint.shape[0]} is not a multiple of the {n} active adapters")
        batch = hint.shape[0] // n
        if timesteps.shape[0] != batch or context.shape[0] != batch:
            raise ValueError(f"hint holds {n} x {batch} samples but timesteps has {timesteps.shape[0]} "
                             f"and context {context.shape[0]}")
        if adapters is not None:
            adapters = adapters.to(hint.device, hint.dtype)
            timesteps = timesteps.repeat(n)
            context = context.repeat(n, 1, 1)

        with self.runtime.active(adapters):
            outs = self._trunk(hint, timesteps, context.to(hint.dtype), adapters, gradient_checkpointing)
        if adapters is None:
            return outs
        acc = accumulation_dtype(hint.dtype)  # the weighted sum rounds once in half precision
        weights = adapters.weights.to(hint.device, acc)
        return [torch.einsum("n,nb...->b...", weights, o.reshape(n, batch, *o.shape[1:]).to(acc)).to(o.dtype)
                for o in outs]

    def _trunk(self, h: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
               adapters: AdapterStack | None, gradient_checkpointing: bool) -> list[torch.Tensor]:
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(h.dtype))
        outs = []
        for block, zero_conv in zip(self.input_blocks, self.zero_convs):
            if gradient_checkpointing and torch.is_grad_enabled():
                # The block is recomputed during backward, after forward returned: hand it the
                # adapters explicitly so the recomputation sees the same ones.
                h = checkpoint(self._block_with_adapters, block, adapters, h, emb, context, use_reentrant=False)
            else:
                h = block(h, emb, context)
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs

    def _block_with_adapters(self, block: nn.Module, adapters: AdapterStack | None, h: torch.Tensor,
                             emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        with self.runtime.active(adapters):
            return block(h, emb, context)
