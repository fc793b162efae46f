"""Building blocks of the SD1.x UNet encoder, named like the original LDM modules.

Submodule names follow the LDM state-dict layout (`in_layers.0`, `emb_layers.1`,
`transformer_blocks.0.attn1.to_q`, `ff.net.0.proj`, ...), so official weights load with
no renaming. Every learnable layer comes from an `ops` namespace (see `layers.build_ops`),
and attention uses `torch.nn.functional.scaled_dot_product_attention`.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import ControlNetConfig


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (integer or float) timesteps, cosines first as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class EmbedSequential(nn.Sequential):
    """A sequence of layers; ResBlocks also get the time embedding, transformers the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    """LDM ResBlock: norm-act-conv, add projected time embedding, norm-act-conv, skip.

    The GroupNorms compute in float32 at least, as LDM's GroupNorm32 does (float64 stays
    float64, so a float64 copy of the model is a reference for float32 rounding).
    """

    def __init__(self, ops: SimpleNamespace, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            ops.GroupNorm(32, channels), nn.SiLU(), ops.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.LoRALinear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            ops.GroupNorm(32, out_channels), nn.SiLU(), nn.Dropout(0.0),
            ops.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (
            nn.Identity() if out_channels == channels else ops.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm_in, act_in, conv_in = self.in_layers
        h = conv_in(act_in(norm_in(_at_least_float32(x)).to(x.dtype)))
        e = self.emb_layers(emb).to(h.dtype)
        h = h + e[..., None, None]
        norm_out, act_out, drop, conv_out = self.out_layers
        h = conv_out(drop(act_out(norm_out(_at_least_float32(h)).to(h.dtype))))
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (`op`)."""

    def __init__(self, ops: SimpleNamespace, channels: int):
        super().__init__()
        self.op = ops.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 upsampling followed by a 3x3 convolution (`conv`); used by the UNet decoder."""

    def __init__(self, ops: SimpleNamespace, channels: int):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, ops: SimpleNamespace, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = ops.LoRALinear(query_dim, inner, bias=False)
        self.to_k = ops.LoRALinear(context_dim, inner, bias=False)
        self.to_v = ops.LoRALinear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(ops.LoRALinear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v.to(q.dtype), dropout_p=0.0)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class GEGLU(nn.Module):
    """Gated GELU projection (`proj` outputs value and gate)."""

    def __init__(self, ops: SimpleNamespace, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = ops.LoRALinear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width (`net.0.proj`, `net.2`)."""

    def __init__(self, ops: SimpleNamespace, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(ops, dim, inner), nn.Dropout(0.0), ops.LoRALinear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, each pre-normed and residual."""

    def __init__(self, ops: SimpleNamespace, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(ops, dim, heads, dim_head)
        self.ff = FeedForward(ops, dim)
        self.attn2 = CrossAttention(ops, dim, heads, dim_head, context_dim)
        self.norm1 = ops.AdapterLayerNorm(dim)
        self.norm2 = ops.AdapterLayerNorm(dim)
        self.norm3 = ops.AdapterLayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Norm, project in (1x1 conv or linear), transformer blocks, project out, residual."""

    def __init__(self, ops: SimpleNamespace, channels: int, heads: int, dim_head: int, depth: int,
                 context_dim: int, use_linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = ops.AdapterGroupNorm(32, channels, eps=1e-6)
        if use_linear:
            self.proj_in = ops.LoRALinear(channels, inner)
            self.proj_out = ops.LoRALinear(inner, channels)
        else:
            self.proj_in = ops.Conv2d(channels, inner, 1)
            self.proj_out = ops.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(ops, inner, heads, dim_head, context_dim) for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c y x -> b (y x) c")
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = rearrange(h, "b (y x) c -> b c y x", y=height, x=width).contiguous()  # NCHW for the convs after
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


def spatial_transformer(ops: SimpleNamespace, config: ControlNetConfig, channels: int) -> SpatialTransformer:
    """The cross-attention block of `config` at `channels` channels."""
    return SpatialTransformer(ops, channels, config.num_heads, channels // config.num_heads,
                              config.transformer_depth, config.context_dim, config.use_linear_in_transformer)


def unet_encoder(ops: SimpleNamespace, config: ControlNetConfig) -> tuple[nn.Sequential, nn.ModuleList,
                                                                        EmbedSequential, list[int]]:
    """The SD1.x UNet encoder half, shared by the Base ControlNet and the demo's UNet.

    Returns (time_embed, input_blocks, middle_block, channels), where `channels[i]` is the
    width of input block i's output (the middle block keeps the last width).
    """
    mc = config.model_channels
    emb_ch = mc * 4
    time_embed = nn.Sequential(ops.LoRALinear(mc, emb_ch), nn.SiLU(), ops.LoRALinear(emb_ch, emb_ch))
    input_blocks = nn.ModuleList([EmbedSequential(ops.Conv2d(config.in_channels, mc, 3, padding=1))])
    channels = [mc]
    ch = mc
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks[level]):
            layers: list[nn.Module] = [ResBlock(ops, ch, emb_ch, mult * mc)]
            ch = mult * mc
            if config.attention_levels[level]:
                layers.append(spatial_transformer(ops, config, ch))
            input_blocks.append(EmbedSequential(*layers))
            channels.append(ch)
        if level != len(config.channel_mult) - 1:
            input_blocks.append(EmbedSequential(Downsample(ops, ch)))
            channels.append(ch)
    middle_block = EmbedSequential(
        ResBlock(ops, ch, emb_ch, ch), spatial_transformer(ops, config, ch), ResBlock(ops, ch, emb_ch, ch))
    return time_embed, input_blocks, middle_block, channels
