"""The Base ControlNet inside ComfyUI: one module per file, managed like a core model.

`load_base_handle(path)` builds the `ctrlora_core` model with ComfyUI's layer classes
(`comfy.ops`, so it runs in the dtype ComfyUI picks for the device and supports
low-VRAM casting), in that dtype on the offload device, and wraps it in a
`comfy.model_patcher.ModelPatcher`: ComfyUI moves it to the GPU for sampling and
back, like the UNet. Loaders of the same file (same size and mtime) share one handle.

One module, many users. Every Apply CtrLoRA control of a sampling run hands ComfyUI
the same ModelPatcher (`BaseHandle.claim`, called from the control's `get_models`,
which ComfyUI calls for all controls before it loads anything). ModelPatcher clones
with different weight patches cannot both be active in one run (they share the
module's tensors), so the handle decides per run:

- every control of the run wants the same single LoRA merged: the patcher carries that
  LoRA as weight patches; the controls run the plain module (a plain ControlNet step);
- anything else (several conditions, or two controls with different LoRAs): the
  patcher carries no patches, and each control applies its adapters at forward time.

Controls ask `merged_key` which case they are in; `ensure_loaded` repairs the rare case
where something else loaded the module in between.
"""
from __future__ import annotations

import os
import uuid
import weakref
from types import SimpleNamespace
from typing import Any, Hashable

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
from ..ctrlora_core.controlnet import CtrLoRAControlNet
from ..ctrlora_core.files import file_stamp
from ..ctrlora_core.formats import load_base

# Dtypes ComfyUI may pick for the base (as for the SD1.5 UNet).
SUPPORTED_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def host_ops(dtype: torch.dtype, manual_cast_dtype: torch.dtype | None) -> SimpleNamespace:
    """ComfyUI's layer classes for this dtype, as core ControlNets get them.

    GroupNorms always cast their (small) affine weights to the input: the ResBlocks
    normalise in float32 even when the weights are half precision.
    """
    ops = comfy.ops.pick_operations(dtype, manual_cast_dtype, disable_fast_fp8=True)

    class GroupNorm(ops.GroupNorm):
        comfy_cast_weights = True

    return SimpleNamespace(Linear=ops.Linear, Conv2d=ops.Conv2d, GroupNorm=GroupNorm, LayerNorm=ops.LayerNorm)


class BaseHandle:
    """A loaded Base ControlNet (the `CTRLORA_BASE` value) and its per-run merge decision."""

    def __init__(self, module: CtrLoRAControlNet, patcher: Any, path: str, compute_dtype: torch.dtype):
        self.module = module
        self.patcher = patcher
        self.path = path
        self.compute_dtype = compute_dtype
        self.merged_key: Hashable | None = None  # the LoRA the patcher carries now (None: clean weights)
        self._merged_patches: dict | None = None  # the control's patches the patcher carries for it
        self._claims: dict[Hashable | None, dict | None] = {}
        self._planning = False

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def claim(self, key: Hashable | None, patches: dict[str, Any] | None) -> Any:
        """Register a control that uses this base in the coming run; return the patcher to load.

        `key`/`patches`: the one LoRA the control would like merged, or None when it
        applies adapters at forward time. The first claim after a run started (see
        `end_planning`) begins a new plan.
        """
        if not self._planning:
            self._claims = {}
            self._planning = True
        self._claims[key] = patches
        wanted = next(iter(self._claims)) if len(self._claims) == 1 else None
        if wanted != self.merged_key:
            self.patcher.patches = {}
            self.patcher.patches_uuid = uuid.uuid4()
            self._merged_patches = self._claims[wanted] if wanted is not None else None
            if wanted is not None:
                self.patcher.add_patches(self._merged_patches)
            self.merged_key = wanted
        elif wanted is not None and self._claims[wanted] is not self._merged_patches:
            self._carry_newer_patches(self._claims[wanted])
        return self.patcher

    def _carry_newer_patches(self, patches: dict[str, Any]) -> None:
        """Carry a newer control's patches for the LoRA already merged (same file, same strength).

        The merged weights stay (no second merge: same uuid), and the patcher no longer holds
        the adapter tensors of an older control, which ComfyUI may have dropped long ago (a
        prompt that failed, then the same LoRA applied again). The dict is refilled in place:
        a low-VRAM load reads its patches from it at every forward.
        """
        patches_uuid = self.patcher.patches_uuid
        self.patcher.patches.clear()
        self.patcher.add_patches(patches)
        self.patcher.patches_uuid = patches_uuid
        self._merged_patches = patches

    def end_planning(self) -> None:
        """Sampling started (ComfyUI loaded the models): the next claim belongs to a new run."""
        self._planning = False

    def ensure_loaded(self) -> None:
        """Load the patcher (again) unless the module holds exactly its current patches."""
        if getattr(self.module, "current_weight_patches_uuid", None) != self.patcher.patches_uuid:
            mm.load_models_gpu([self.patcher])

    def summary(self) -> str:
        params = sum(p.numel() for p in self.module.parameters())
        return f"{self.name}: {params / 1e6:.1f}M params, {str(self.compute_dtype).replace('torch.', '')}"


_handles: "weakref.WeakValueDictionary[tuple, BaseHandle]" = weakref.WeakValueDictionary()


def load_base_handle(path: str, dtype: torch.dtype | None = None) -> BaseHandle:
    """The shared handle of the base file at `path` (loaded on first use, in ComfyUI's dtype unless given)."""
    key = (*file_stamp(path), dtype)
    handle = _handles.get(key)
    if handle is None:
        load_device = mm.get_torch_device()
        offload_device = mm.unet_offload_device()
        weight_dtype = dtype or mm.unet_dtype(model_params=-1, supported_dtypes=SUPPORTED_DTYPES)
        manual_cast_dtype = mm.unet_manual_cast(weight_dtype, load_device)
        module = load_base(path, host_ops=host_ops(weight_dtype, manual_cast_dtype), dtype=weight_dtype,
                           device=offload_device)
        patcher = comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)
        handle = BaseHandle(module, patcher, path, manual_cast_dtype or weight_dtype)
        _handles[key] = handle
    return handle
