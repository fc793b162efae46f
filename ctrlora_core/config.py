"""Architecture config of a CtrLoRA Base ControlNet, inferred from a state dict's shapes.

Nothing is hard-coded to SD1.5: the channel widths, blocks per level, which levels
have attention, transformer depth, context width and linear-vs-conv projections are
all read from the weights. Only the number of attention heads cannot be seen in the
weights (it does not change any shape); it defaults to SD1.x's 8 heads.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Mapping

import torch

from .errors import CheckpointError

SD15_NUM_HEADS = 8

ShapeLike = torch.Tensor | tuple[int, ...]  # a tensor, or just its shape (from a file header)


@dataclass(frozen=True)
class ControlNetConfig:
    """Shape of the ControlNet trunk (defaults: SD1.5)."""

    in_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    transformer_depth: int = 1
    context_dim: int = 768
    num_heads: int = SD15_NUM_HEADS
    use_linear_in_transformer: bool = False

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if len(self.num_res_blocks) != levels or len(self.attention_levels) != levels:
            raise ValueError("channel_mult, num_res_blocks and attention_levels need one entry per level")
        for mult in self.channel_mult:
            ch = mult * self.model_channels
            if ch % 32:
                raise ValueError(f"channel width {ch} is not a multiple of 32 (GroupNorm uses 32 groups)")
            if ch % self.num_heads:
                raise ValueError(f"channel width {ch} is not divisible by num_heads={self.num_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(sd: Mapping[str, ShapeLike], key: str) -> tuple[int, ...]:
    value = sd[key]
    return tuple(value.shape if isinstance(value, torch.Tensor) else value)


def infer_config(sd: Mapping[str, ShapeLike], num_heads: int = SD15_NUM_HEADS) -> ControlNetConfig:
    """Infer the trunk config from an (un-prefixed) Base ControlNet state dict or its key -> shape table.

    Raises CheckpointError naming the missing or inconsistent key.
    """
    first = "input_blocks.0.0.weight"
    if first not in sd:
        raise CheckpointError(f"not a ControlNet trunk: key {first!r} is missing")
    model_channels, in_channels = _shape(sd, first)[:2]

    block_ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    if block_ids != list(range(len(block_ids))):
        raise CheckpointError(f"input_blocks are not numbered 0..n without gaps: {block_ids}")

    levels: list[list[int]] = [[]]  # out-channels of the ResBlocks of each level
    attention: list[list[bool]] = [[]]
    depths = set()
    use_linear = None
    for i in block_ids[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:  # downsampler closes a level
            levels.append([])
            attention.append([])
            continue
        out_key = f"input_blocks.{i}.0.out_layers.3.weight"
        if out_key not in sd:
            raise CheckpointError(f"input block {i} is neither a ResBlock nor a downsampler ({out_key!r} missing)")
        levels[-1].append(_shape(sd, out_key)[0])
        has_attn = f"input_blocks.{i}.1.norm.weight" in sd
        attention[-1].append(has_attn)
        if has_attn:
            depth = len({m.group(1) for k in sd
                         if (m := re.match(rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.", k))})
            depths.add(depth)
            proj = f"input_blocks.{i}.1.proj_in.weight"
            if proj not in sd:
                raise CheckpointError(f"input block {i} has attention but no proj_in weight")
            use_linear = len(_shape(sd, proj)) == 2

    channel_mult = []
    for level, chans in enumerate(levels):
        if not chans:
            raise CheckpointError(f"level {level} of the input blocks has no ResBlock")
        if len(set(chans)) != 1 or chans[0] % model_channels:
            raise CheckpointError(f"level {level} has inconsistent ResBlock widths {chans}")
        channel_mult.append(chans[0] // model_channels)
    attention_levels = []
    for level, flags in enumerate(attention):
        if len(set(flags)) != 1:
            raise CheckpointError(f"level {level} mixes blocks with and without attention: {flags}")
        attention_levels.append(flags[0])
    if len(depths) > 1:
        raise CheckpointError(f"transformer depth differs between blocks: {sorted(depths)} (unsupported)")

    ctx_keys = [k for k in sd if k.endswith("transformer_blocks.0.attn2.to_k.weight")]
    if not ctx_keys:
        raise CheckpointError("no cross-attention found (expected '...attn2.to_k.weight'): "
                              "CtrLoRA needs a text-conditioned trunk")
    if "middle_block.1.norm.weight" not in sd:
        raise CheckpointError("middle block has no spatial transformer ('middle_block.1.norm.weight' missing)")
    return ControlNetConfig(
        in_channels=in_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=tuple(len(c) for c in levels),
        attention_levels=tuple(attention_levels),
        transformer_depth=depths.pop() if depths else 1,
        context_dim=_shape(sd, ctx_keys[0])[1],
        num_heads=num_heads,
        use_linear_in_transformer=bool(use_linear),
    )
