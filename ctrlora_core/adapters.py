"""Condition adapters: LoRA on every Linear + the condition's own zero convs and attention norms.

An adapter holds its tensors in the official file layout, without the `control_model.`
prefix (spec §2-3):

- `<linear>.lora_layer.down.weight` [r, in] and `<linear>.lora_layer.up.weight` [out, r];
  the update is W + strength * up @ down (no alpha, scale 1);
- `zero_convs.<i>.0.{weight,bias}` and `middle_block_out.0.{weight,bias}`;
- `<...>.norm.{weight,bias}` and `<...>.norm{1,2,3}.{weight,bias}` of the spatial transformers.

This module covers what one does with adapters: creating a fresh one for training,
checking one against a base, stacking several for one batched forward pass
(`stack_adapters`), blending several into one, and merging one into the base weights
(the single-condition fast path).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch

from .adapter_stack import AdapterStack
from .controlnet import CtrLoRAControlNet
from .errors import CheckpointError

LORA_DOWN = ".lora_layer.down.weight"
LORA_UP = ".lora_layer.up.weight"


def is_adapter_key(key: str) -> bool:
    """Whether an (un-prefixed) key belongs to a condition adapter rather than the shared base."""
    return "lora_layer" in key or key.startswith(("zero_convs.", "middle_block_out.")) or "norm" in key


@dataclass
class CtrLoRAAdapter:
    """One condition's adapter tensors (official layout) and the metadata of its file."""

    tensors: dict[str, torch.Tensor]
    name: str = "adapter"
    metadata: dict[str, str] = field(default_factory=dict)

    def lora_modules(self) -> list[str]:
        return sorted(k[: -len(LORA_DOWN)] for k in self.tensors if k.endswith(LORA_DOWN))

    def set_modules(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.tensors if "lora_layer" not in k})

    def lora_pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[module + LORA_DOWN], self.tensors[module + LORA_UP]

    def set_pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[module + ".weight"], self.tensors[module + ".bias"]

    @property
    def rank(self) -> int:
        ranks = {self.tensors[m + LORA_DOWN].shape[0] for m in self.lora_modules()}
        if len(ranks) != 1:
            raise CheckpointError(f"adapter {self.name!r} mixes LoRA ranks {sorted(ranks)}")
        return ranks.pop()

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def layout_signature(self) -> tuple:
        """Layer names and in/out shapes, independent of rank: equal for adapters of one base."""
        lora = tuple((m, self.tensors[m + LORA_DOWN].shape[1], self.tensors[m + LORA_UP].shape[0])
                     for m in self.lora_modules())
        sets = tuple((k, tuple(t.shape)) for k, t in sorted(self.tensors.items()) if "lora_layer" not in k)
        return lora, sets

    @classmethod
    def fresh(cls, model: CtrLoRAControlNet, rank: int, generator: torch.Generator | None = None,
              name: str = "new") -> "CtrLoRAAdapter":
        """A new adapter as the official fine-tuning starts one (spec §2).

        down ~ N(0, (1/rank)^2), up = 0, zero convs and norms copied from the base:
        with it the model computes exactly the Base ControlNet.
        """
        tensors: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        for linear in model.lora_module_names():
            layer = modules[linear]
            down = torch.empty(rank, layer.in_features)
            down.normal_(0.0, 1.0 / rank, generator=generator)
            tensors[linear + LORA_DOWN] = down
            tensors[linear + LORA_UP] = torch.zeros(layer.out_features, rank)
        for module in model.set_module_names():
            layer = modules[module]
            tensors[module + ".weight"] = layer.weight.detach().float().cpu().clone()
            tensors[module + ".bias"] = layer.bias.detach().float().cpu().clone()
        return cls(tensors, name=name, metadata={"rank": str(rank)})

    def check_against(self, model: CtrLoRAControlNet, source: str | None = None) -> None:
        """Raise CheckpointError unless this adapter fits `model` key for key and shape for shape."""
        check_adapter_shapes({k: tuple(v.shape) for k, v in self.tensors.items()}, model, source or self.name)


def check_adapter_shapes(shapes: Mapping[str, tuple[int, ...]], model: CtrLoRAControlNet, where: str) -> None:
    """Raise CheckpointError naming `where` unless adapter tensors of these (un-prefixed) shapes fit `model`.

    Shapes alone decide, so a file is checked from its header before its tensors are read.
    """
    expected = expected_adapter_shapes(model, rank=None)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing:
        raise CheckpointError(
            f"LoRA is incomplete for this base: {len(missing)} of {len(expected)} expected keys are "
            f"missing, e.g. {missing[:3]}", where)
    if unexpected:
        raise CheckpointError(
            f"LoRA has {len(unexpected)} keys this base does not have, e.g. {unexpected[:3]} "
            "(made for a different base architecture?)", where)
    modules = sorted(k[: -len(LORA_DOWN)] for k in shapes if k.endswith(LORA_DOWN))
    for module in modules:
        down, up = shapes[module + LORA_DOWN], shapes[module + LORA_UP]
        if len(down) != 2 or len(up) != 2 or down[0] != up[1]:
            raise CheckpointError(
                f"rank mismatch at {module!r}: down is {list(down)} and up is {list(up)} "
                "(expected down [r, in] and up [out, r] with the same r)", where)
    ranks = {shapes[m + LORA_DOWN][0] for m in modules}
    if len(ranks) != 1:
        raise CheckpointError(f"adapter mixes LoRA ranks {sorted(ranks)}", where)
    rank = ranks.pop()
    for key, shape in expected.items():
        want = tuple(rank if s is None else s for s in shape)
        if tuple(shapes[key]) != want:
            raise CheckpointError(
                f"shape mismatch at {key!r}: the file has {list(shapes[key])}, this base expects {list(want)} "
                "(made for a different base model?)", where)


def stack_adapters(adapters: Sequence[CtrLoRAAdapter], weights: Sequence[float] | None = None,
                   lora_strengths: Sequence[float] | None = None) -> AdapterStack:
    """Stack `adapters` for one batched pass; `weights` and `lora_strengths` default to 1.0 each.

    Ranks are zero-padded to the largest one (exact); each strength is folded into its `up`.
    """
    if not adapters:
        raise ValueError("stack_adapters needs at least one adapter")
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
    return AdapterStack(lora=lora, sets=sets, weights=torch.tensor(weights, dtype=torch.float32))


def expected_adapter_shapes(model: CtrLoRAControlNet, rank: int | None) -> dict[str, tuple]:
    """Key -> shape of a complete adapter for `model` (None stands for the rank when rank is None)."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple] = {}
    for linear in model.lora_module_names():
        layer = modules[linear]
        shapes[linear + LORA_DOWN] = (rank, layer.in_features)
        shapes[linear + LORA_UP] = (layer.out_features, rank)
    for module in model.set_module_names():
        layer = modules[module]
        shapes[module + ".weight"] = tuple(layer.weight.shape)
        shapes[module + ".bias"] = tuple(layer.bias.shape)
    return shapes


def blend_adapters(adapters: Sequence[CtrLoRAAdapter], weights: Sequence[float], rank: int | None = None,
                   name: str = "blend") -> tuple[CtrLoRAAdapter, float]:
    """Combine adapters linearly into one: dW = sum w_i up_i down_i, sets = sum w_i set_i.

    With `rank=None` the LoRA factors are concatenated (exact, rank = sum of ranks).
    With a rank, each dW is re-factored by truncated SVD to that rank (what official loaders
    with a fixed rank need). Returns the adapter and the worst relative Frobenius error of
    the re-factored dW over all layers (0.0 when exact).
    """
    if len(adapters) < 2 or len(adapters) != len(weights):
        raise ValueError(f"blending needs >= 2 adapters with one weight each, got {len(adapters)} and {len(weights)}")
    base = adapters[0]
    for other in adapters[1:]:
        if other.layout_signature() != base.layout_signature():
            raise CheckpointError(f"cannot blend {base.name!r} with {other.name!r}: they fit different base models")
    tensors: dict[str, torch.Tensor] = {}
    worst = 0.0
    for module in base.lora_modules():
        pairs = [a.lora_pair(module) for a in adapters]
        down = torch.cat([d.float() for d, _ in pairs], 0)
        up = torch.cat([u.float() * w for (_, u), w in zip(pairs, weights)], 1)
        if rank is not None and rank < down.shape[0]:
            delta = up @ down
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            up, down = u[:, :rank] * s[:rank], vh[:rank]
            norm = delta.norm()
            if norm > 0:
                worst = max(worst, float((delta - up @ down).norm() / norm))
        tensors[module + LORA_DOWN] = down.contiguous()
        tensors[module + LORA_UP] = up.contiguous()
    for module in base.set_modules():
        for suffix in (".weight", ".bias"):
            tensors[module + suffix] = sum(a.tensors[module + suffix].float() * w for a, w in zip(adapters, weights))
    return CtrLoRAAdapter(tensors, name=name), worst


@contextlib.contextmanager
def merged_adapter(model: CtrLoRAControlNet, adapter: CtrLoRAAdapter, strength: float = 1.0) -> Iterator[None]:
    """Temporarily write `adapter` into the base weights (W += strength * up @ down; sets copied).

    Inside the block the model runs at exactly the cost of a plain ControlNet; the original
    weights are restored on exit.
    """
    adapter.check_against(model)
    params = dict(model.named_parameters())
    backup: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for module in adapter.lora_modules():
                weight = params[module + ".weight"]
                backup[module + ".weight"] = weight.detach().clone()
                down, up = adapter.lora_pair(module)
                delta = (up.float() @ down.float()) * strength
                weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
            for module in adapter.set_modules():
                for suffix in (".weight", ".bias"):
                    target = params[module + suffix]
                    backup[module + suffix] = target.detach().clone()
                    target.copy_(adapter.tensors[module + suffix].to(target.device, target.dtype))
        yield
    finally:
        with torch.no_grad():
            for key, value in backup.items():
                params[key].copy_(value)
