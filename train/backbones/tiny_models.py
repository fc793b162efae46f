"""Miniature versions of the three frozen SD1.5 models, for the bundled demo and the tests.

Public API (stable; the demo pretrains these classes and `tiny.py` loads them):

- `TINY_CONFIG`: the demo's `ControlNetConfig` (4 levels, 13 residuals, context width 64).
- `TinyUNet(config=TINY_CONFIG, out_channels=4)`: an SD-layout UNet (`time_embed`,
  `input_blocks`, `middle_block`, `output_blocks`, `out`) built from `ctrlora_core.blocks`;
  `forward(x, timesteps, context, control=None) -> eps`, where `control` is the list of
  the 13 CtrLoRA residuals in official order (zero convs 0..11, then middle).
- `TinyAutoencoder(channels=(32, 64, 64, 64), latent_channels=4, groups=8)`: a KL autoencoder
  with 8x downsampling; `encode_moments(images) -> [B, 8, h, w]` (mean, logvar),
  `decode(latents) -> images`; `.settings` = its constructor arguments.
- `TinyTextEncoder(width=64, layers=2, heads=4, max_length=32, vocab_size=4096)`: hashed
  word tokens + a small transformer; `tokenize(prompts)`, `forward(tokens)`, `encode(prompts)`;
  `.settings` = its constructor arguments.

The UNet's encoder has exactly the ControlNet's parameter names, so a Base ControlNet can be
started from it by a plain state-dict load (`demo/pretrain_demo.py` does).
"""
from __future__ import annotations

import functools
import re
import zlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctrlora_core.blocks import (CrossAttention, EmbedSequential, FeedForward, ResBlock, SpatialTransformer,
                                 Upsample, spatial_transformer, timestep_embedding, unet_encoder)
from ctrlora_core.config import ControlNetConfig
from ctrlora_core.layers import build_ops

TINY_CONFIG = ControlNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=64)


class TinyUNet(nn.Module):
    """SD1.x UNet layout at any `ControlNetConfig` size, predicting the noise (eps).

    config:       trunk shape; the encoder half is identical to `CtrLoRAControlNet(config)`.
    out_channels: channels of the predicted noise (= latent channels, 4).

    Any latent size works (the decoder upsamples to the size of each skip, as ComfyUI's UNet).
    Set `gradient_checkpointing = True` to recompute blocks in the backward pass.
    """

    def __init__(self, config: ControlNetConfig = TINY_CONFIG, out_channels: int = 4):
        super().__init__()
        self.config = config
        self.out_channels = out_channels
        self.gradient_checkpointing = False
        ops = build_ops()
        mc = config.model_channels
        emb_ch = mc * 4
        self.time_embed, self.input_blocks, self.middle_block, skip_channels = unet_encoder(ops, config)
        ch = skip_channels[-1]
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(config.channel_mult))):
            mult = config.channel_mult[level]
            for i in range(config.num_res_blocks[level] + 1):
                layers = [ResBlock(ops, ch + skip_channels.pop(), emb_ch, mult * mc)]
                ch = mult * mc
                if config.attention_levels[level]:
                    layers.append(spatial_transformer(ops, config, ch))
                if level and i == config.num_res_blocks[level]:
                    layers.append(Upsample(ops, ch))
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(ops.GroupNorm(32, ch), nn.SiLU(), ops.Conv2d(ch, out_channels, 3, padding=1))

    def _run(self, function, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    @staticmethod
    def _output_block(block: EmbedSequential, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                      size: tuple[int, int] | None) -> torch.Tensor:
        """One decoder block; its upsampler targets `size` (the next skip's), so odd latent sizes work."""
        for layer in block:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            else:  # Upsample
                h = layer.conv(F.interpolate(h, size=size, mode="nearest"))
        return h

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                control: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Predicted noise [B, C, h, w] for noisy latents x at `timesteps` [B] with text `context` [B, L, D].

        control: the ControlNet residuals, official order: residual i (i < n-1) is added to
        the skip saved after input block i, the last one to the middle block's output.
        """
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"expected {len(self.input_blocks) + 1} control residuals, got {len(control)}")
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        context = context.to(x.dtype)
        h = x
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        if control is not None:
            h = h + control[-1].to(h.dtype)
        for block in self.output_blocks:
            skip = skips.pop()
            if control is not None:
                skip = skip + control[len(skips)].to(skip.dtype)
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = self._run(functools.partial(self._output_block, block, size=size),
                          torch.cat([h, skip], dim=1), emb, context)
        norm, act, conv = self.out
        return conv(act(norm(h.float()).to(h.dtype)))


class _ConvBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a (1x1 projected) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.GroupNorm(groups, out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class TinyAutoencoder(nn.Module):
    """KL autoencoder like SD's VAE, small: 2 ** (len(channels) - 1) downsampling (8x by default).

    channels:        width of each resolution level, finest first (divisible by `groups`).
    latent_channels: channels of the latent (SD: 4); the encoder outputs 2x that (mean, logvar).
    groups:          GroupNorm groups.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 64, 64), latent_channels: int = 4, groups: int = 8):
        super().__init__()
        channels = list(channels)
        self.settings = {"channels": channels, "latent_channels": latent_channels, "groups": groups}
        self.latent_channels = latent_channels
        self.downsampling = 2 ** (len(channels) - 1)
        enc: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1)]
        ch = channels[0]
        for level, width in enumerate(channels):
            enc.append(_ConvBlock(ch, width, groups))
            ch = width
            if level != len(channels) - 1:
                enc.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        enc += [nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, ch, 3, padding=1)]
        for level, width in reversed(list(enumerate(channels))):
            dec.append(_ConvBlock(ch, width, groups))
            ch = width
            if level:
                dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        dec += [nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior moments [B, 2*latent_channels, H/f, W/f]: mean, then log-variance."""
        if images.shape[-1] % self.downsampling or images.shape[-2] % self.downsampling:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {self.downsampling}")
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] (the range the autoencoder was trained on; [-1, 1] for targets)."""
        return self.decoder(latents)


_WORDS = re.compile(r"\w+|[^\w\s]")


class _TextBlock(nn.Module):
    """Pre-norm self-attention + GEGLU feed-forward."""

    def __init__(self, ops, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CrossAttention(ops, width, heads, width // heads)
        self.norm2 = nn.LayerNorm(width)
        self.ff = FeedForward(ops, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class TinyTextEncoder(nn.Module):
    """Text encoder standing in for CLIP: hashed word tokens, learned positions, a few transformer blocks.

    width:      embedding width (= the UNet's context_dim).
    layers:     transformer blocks.
    heads:      attention heads (must divide width).
    max_length: tokens per prompt, BOS and EOS included (longer prompts are truncated).
    vocab_size: hash buckets for words (ids 0..2 are pad, BOS, EOS).

    Tokens: lower-cased words and punctuation, each hashed with CRC32 into a bucket, so any
    text has a fixed, deterministic encoding with no vocabulary file.
    """

    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4, max_length: int = 32,
                 vocab_size: int = 4096):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.settings = {"width": width, "layers": layers, "heads": heads, "max_length": max_length,
                         "vocab_size": vocab_size}
        self.max_length = max_length
        self.vocab_size = vocab_size
        ops = build_ops()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, width))
        self.blocks = nn.ModuleList(_TextBlock(ops, width, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, max_length] (int64) for N prompts."""
        rows = []
        for prompt in prompts:
            words = _WORDS.findall(prompt.lower())[: self.max_length - 2]
            ids = [self.BOS] + [3 + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 3) for w in words] + [self.EOS]
            rows.append(ids + [self.PAD] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.int64)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, max_length, width] of token ids [N, max_length]."""
        x = self.token_embedding(tokens) + self.position_embedding
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings of prompts (tokenize + forward) on the encoder's device."""
        return self(self.tokenize(prompts).to(self.position_embedding.device))

