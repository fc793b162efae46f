"""Layer classes the model is built from, and the adapter-aware variants of them.

A host (ComfyUI) injects its own `Linear`, `Conv2d`, `GroupNorm` and `LayerNorm`
classes (for example `comfy.ops.manual_cast`, which casts weights to the input dtype
and supports low-VRAM offload). Any object with those four attributes works; the
default is plain `torch.nn`.

`build_ops(host_ops)` derives the namespace the CtrLoRA ControlNet is built from:
the host's classes, plus subclasses of them that apply the *active condition
adapters* at forward time:

- `LoRALinear`: y = W x + b + up_i(down_i(x)) for the samples of adapter i (at inference,
  computed through W + (up_i down_i) when that is cheaper: many tokens, wide layers);
- `AdapterConv2d` (zero convs) and `AdapterGroupNorm` / `AdapterLayerNorm`
  (attention norms): adapter i *replaces* the layer's weight and bias.

The batch is laid out adapter-major: with N adapters and B samples each, rows
[i*B, (i+1)*B) belong to adapter i. Without active adapters every layer behaves
exactly like its host class, so the base weights are never copied or rewritten.

With float16/bfloat16 compute the adapter arithmetic (low-rank update and sum, merged weight,
zero-conv matmul and bias, norm and affine) accumulates in float32 and is rounded once, like
the fused host layer it stands for; in float32 the ops are the same as without that rule.

Code that needs a Linear's weight itself (the merged inference path) asks the host for it
through `cast_weights` (see `build_ops`): a host may keep weights offloaded, in another
dtype, or add its own weight patches when it casts them for a forward, so reading
`layer.weight` directly could see the wrong device or miss those patches.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_stack import AdapterStack


class AdapterRuntime:
    """Holds the adapter stack that is active during one forward pass (or none)."""

    def __init__(self) -> None:
        self.stack: AdapterStack | None = None

    @contextlib.contextmanager
    def active(self, stack: AdapterStack | None) -> Iterator[None]:
        """Make `stack` the active adapters inside the block; the previous ones come back after."""
        previous, self.stack = self.stack, stack
        try:
            yield
        finally:
            self.stack = previous


class _AdapterSlot:
    """Mixin: where an adapted layer learns its key and the shared runtime."""

    ctrlora_key: str = ""
    ctrlora_runtime: AdapterRuntime | None = None

    def active_stack(self) -> AdapterStack | None:
        runtime = self.ctrlora_runtime
        return None if runtime is None else runtime.stack


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the adapter arithmetic runs in: float32 for half-precision compute, else `dtype`.

    A fused host layer (conv with bias, norm with affine, linear with merged weights) rounds
    its result once; the adapted forms are several ops (matmul then bias, norm then affine,
    base plus low-rank update), and each op rounding in float16/bfloat16 would add to it.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _per_adapter(y: torch.Tensor, n: int) -> torch.Tensor:
    """View an adapter-major batch [n*B, ...] as [n, B, ...]."""
    return y.reshape(n, y.shape[0] // n, *y.shape[1:])


@contextlib.contextmanager
def plain_cast_weights(layer: nn.Module, dtype: torch.dtype,
                       device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The default `cast_weights`: the layer's own weight and bias in `dtype` on `device`."""
    bias = None if layer.bias is None else layer.bias.to(device, dtype)
    yield layer.weight.to(device, dtype), bias


def _make_lora_linear(base: type, cast_weights: Any) -> type:
    class LoRALinear(base, _AdapterSlot):  # type: ignore[misc, valid-type]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            stack = self.active_stack()
            pair = None if stack is None else stack.lora.get(self.ctrlora_key)
            if pair is None:
                return super().forward(x)
            down_t, up_t = pair  # [n, in, r], [n, r, out]; strength folded into up
            n, features_in, _ = down_t.shape
            xs = x.reshape(n, -1, features_in).to(down_t.dtype)
            tokens, features_out = xs.shape[1], self.out_features
            if not torch.is_grad_enabled() and tokens * (features_in + features_out) > features_in * features_out:
                y = _merged_per_adapter(self, xs, down_t, up_t, cast_weights)
                return y.reshape(*x.shape[:-1], features_out).to(x.dtype)
            y = super().forward(x)
            # The update and the sum in float32 for half-precision compute: one rounding of the
            # result, as a layer with merged weights has (no-op casts in float32).
            acc = accumulation_dtype(y.dtype)
            delta = torch.bmm(torch.bmm(xs.to(acc), down_t.to(acc)), up_t.to(acc))
            return (y.to(acc) + delta.reshape(y.shape)).to(y.dtype)

    return LoRALinear


def _merged_per_adapter(layer: nn.Linear, xs: torch.Tensor, down_t: torch.Tensor, up_t: torch.Tensor,
                        cast_weights: Any) -> torch.Tensor:
    """Inference through W_i = W + (down_i up_i)^T, built for this call only: [n, T, in] -> [n, T, out].

    The low-rank path costs T*r*(in+out) per adapter on top of the base layer; building the
    merged weight costs r*in*out, so it wins once an adapter has more than in*out/(in+out)
    tokens (most attention layers at sampling resolutions). It needs n*in*out transient
    memory and is only used without autograd (training keeps the low-rank path's memory).
    In half precision it rounds as a layer whose weights ComfyUI merged: the merged weight
    once (baddbmm accumulates in float32), the output once (bias added inside the matmul).
    """
    with cast_weights(layer, xs.dtype, xs.device) as (weight, bias):  # [out, in], [out]: valid inside only
        merged = torch.baddbmm(weight.t().expand(xs.shape[0], -1, -1), down_t, up_t)  # [n, in, out]
        if bias is None:
            return torch.bmm(xs, merged)
        if accumulation_dtype(xs.dtype) != xs.dtype:
            return torch.baddbmm(bias, xs, merged)
        return torch.bmm(xs, merged) + bias


def _make_adapter_conv(base: type) -> type:
    class AdapterConv2d(base, _AdapterSlot):  # type: ignore[misc, valid-type]
        """A 1x1 zero conv whose weight and bias each adapter replaces."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            stack = self.active_stack()
            pair = None if stack is None else stack.sets.get(self.ctrlora_key)
            if pair is None:
                return super().forward(x)
            weight, bias = pair  # [n, out, in, 1, 1], [n, out]
            n, out_channels = weight.shape[:2]
            if accumulation_dtype(x.dtype) != x.dtype:
                # half precision: bias added inside the matmul, one rounding as a conv with bias has
                rows = x.shape[0] // n
                weight = weight[:, None, :, :, 0, 0].expand(n, rows, -1, -1).reshape(x.shape[0], out_channels, -1)
                bias = bias[:, None, :, None].expand(n, rows, -1, -1).reshape(x.shape[0], out_channels, 1)
                y = torch.baddbmm(bias.to(x.dtype), weight.to(x.dtype), x.flatten(2))  # [n*B, out, HW], NCHW
                return y.reshape(x.shape[0], out_channels, *x.shape[2:])
            xs = _per_adapter(x.flatten(2), n).to(weight.dtype)  # [n, B, in, HW]
            y = torch.matmul(weight[:, None, :, :, 0, 0], xs) + bias[:, None, :, None]  # [n, B, out, HW], NCHW
            return y.reshape(x.shape[0], y.shape[2], *x.shape[2:]).to(x.dtype)

    return AdapterConv2d


def _make_adapter_norm(base: type, functional: Any) -> type:
    class AdapterNorm(base, _AdapterSlot):  # type: ignore[misc, valid-type]
        """An attention norm whose affine weight and bias each adapter replaces."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            stack = self.active_stack()
            pair = None if stack is None else stack.sets.get(self.ctrlora_key)
            if pair is None:
                return super().forward(x)
            weight, bias = pair  # [n, C], [n, C]
            n, channels = weight.shape
            acc = accumulation_dtype(x.dtype)  # normalise and scale in float32: one rounding, as the fused norm
            weight, bias = weight.to(acc), bias.to(acc)
            y = functional(self, x.to(acc))
            if isinstance(self, nn.GroupNorm):  # channels on dim 1: [B, C, H, W]
                shape = (n, 1, channels) + (1,) * (x.dim() - 2)
            else:  # LayerNorm: channels last: [B, L, C]
                shape = (n, 1) + (1,) * (x.dim() - 2) + (channels,)
            y = _per_adapter(y, n) * weight.reshape(shape) + bias.reshape(shape)
            return y.reshape(x.shape).to(x.dtype)

    return AdapterNorm


def _group_norm_no_affine(layer: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, layer.num_groups, None, None, layer.eps)


def _layer_norm_no_affine(layer: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, layer.normalized_shape, None, None, layer.eps)


def build_ops(host_ops: Any = None) -> SimpleNamespace:
    """Return the layer namespace the model is built from.

    `host_ops` is any object with `Linear`, `Conv2d`, `GroupNorm` and `LayerNorm`
    attributes (default: `torch.nn`), and optionally `cast_weights(layer, dtype, device)`:
    a context manager yielding (weight, bias) of a host Linear as the host's own forward
    would use them (default: `plain_cast_weights`). The result has the four layer classes
    plus `LoRALinear`, `AdapterConv2d`, `AdapterGroupNorm` and `AdapterLayerNorm`.
    """
    host = torch.nn if host_ops is None else host_ops
    for name in ("Linear", "Conv2d", "GroupNorm", "LayerNorm"):
        if not hasattr(host, name):
            raise TypeError(f"host ops object {host!r} has no attribute {name!r}")
    return SimpleNamespace(
        Linear=host.Linear,
        Conv2d=host.Conv2d,
        GroupNorm=host.GroupNorm,
        LayerNorm=host.LayerNorm,
        LoRALinear=_make_lora_linear(host.Linear, getattr(host, "cast_weights", plain_cast_weights)),
        AdapterConv2d=_make_adapter_conv(host.Conv2d),
        AdapterGroupNorm=_make_adapter_norm(host.GroupNorm, _group_norm_no_affine),
        AdapterLayerNorm=_make_adapter_norm(host.LayerNorm, _layer_norm_no_affine),
    )
