"""The values that travel between the pack's nodes (custom socket types).

- `CTRLORA_LORA` -> `LoRAHandle`: one condition LoRA and its strength. A file-backed
  handle keeps only the file's path, identity and metadata; the tensors are read when
  Apply CtrLoRA (or a blend) needs them, so ComfyUI's cache of the loader's output
  holds no tensors, and whether the file fits a base is checked from its header
  (`check_against`) before they are read. A blended LoRA lives in memory.
- `CTRLORA_CONDITIONS` -> a tuple of `Condition` (LoRA, condition image, weight).
- `CTRLORA_BASE` -> `nodes.base_model.BaseHandle` (needs ComfyUI, defined there).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

from ..ctrlora_core.adapters import CtrLoRAAdapter, check_adapter_shapes
from ..ctrlora_core.controlnet import CtrLoRAControlNet
from ..ctrlora_core.files import file_stamp
from ..ctrlora_core.formats import FileKind, load_adapter, require_kind

LORA_TYPE = "CTRLORA_LORA"
CONDITIONS_TYPE = "CTRLORA_CONDITIONS"
BASE_TYPE = "CTRLORA_BASE"


@dataclass(frozen=True)
class LoRAHandle:
    """A condition LoRA (file-backed or in memory) with the strength of its low-rank update."""

    name: str
    strength: float
    identity: Hashable  # equal for the same tensors: (path, size, mtime) or a blend's id
    info: dict[str, Any] = field(default_factory=dict, compare=False)  # rank, condition, ... (for display)
    path: str | None = None
    adapter: CtrLoRAAdapter | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_file(cls, path: str, strength: float) -> "LoRAHandle":
        """Read and check the file now (kind, values, ranks); keep only what identifies it."""
        adapter = load_adapter(path)
        info = {**adapter.metadata, "rank": adapter.rank, "tensors": len(adapter.tensors)}
        return cls(adapter.name, strength, file_stamp(path), info, path=path)

    @classmethod
    def in_memory(cls, adapter: CtrLoRAAdapter, info: dict[str, Any]) -> "LoRAHandle":
        return cls(adapter.name, 1.0, ("in-memory", uuid.uuid4().hex), info, adapter=adapter)

    def load(self) -> CtrLoRAAdapter:
        """The adapter tensors (read from the file again for a file-backed handle)."""
        if self.adapter is not None:
            return self.adapter
        assert self.path is not None
        return load_adapter(self.path)

    def check_against(self, model: CtrLoRAControlNet) -> None:
        """Raise CheckpointError unless this LoRA fits `model` (a file's from its header, nothing read)."""
        if self.adapter is not None:
            self.adapter.check_against(model, self.name)
            return
        assert self.path is not None
        summary = require_kind(self.path, FileKind.CTRLORA_LORA)
        check_adapter_shapes(summary.shapes, model, summary.path)

    def summary(self) -> str:
        """One line for the node: name, rank, and from the file's metadata when it has them the
        condition, the maps and blend it was trained on and its loss's region weights."""
        parts = [self.name, f"rank {self.info.get('rank', '?')}"]
        if self.info.get("condition"):
            parts.append(f"condition {self.info['condition']}")
        if self.info.get("maps"):
            maps = str(self.info["maps"]).replace(",", "+")
            blend = f"{self.info.get('blend_mode', '?')} blend {self.info.get('blend_alpha', '?')}"
            parts.append(f"maps {maps} ({blend})" if "," in str(self.info["maps"]) else f"maps {maps}")
        if self.info.get("region_weights"):
            parts.append(f"region weights {self.info['region_weights']}")
        if self.strength != 1.0:
            parts.append(f"strength {self.strength:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Condition:
    """One condition of Apply CtrLoRA: a LoRA, its condition image (BHWC in [0, 1]) and its weight."""

    lora: LoRAHandle
    image: torch.Tensor
    weight: float
