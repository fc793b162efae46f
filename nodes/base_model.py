"""The Base ControlNet inside ComfyUI: one module per file, managed like a core model.

`load_base_handle(path)` builds the `ctrlora_core` model with ComfyUI's layer classes
(`comfy.ops`, so it runs in the dtype ComfyUI picks for the device and supports
low-VRAM casting), in that dtype on the offload device, and wraps it in ComfyUI's core
model patcher (`CoreModelPatcher` where ComfyUI has one: the dynamic-VRAM patcher when
that is on; `ModelPatcher` otherwise): ComfyUI moves it to the GPU for sampling and back,
like the UNet. Loaders of the same file (same size and mtime) share one handle.

One module, many users. Every Apply CtrLoRA control of a sampling run hands ComfyUI
the same patcher. Patcher clones with different weight patches cannot both be active in
one run (they share the module's tensors), so the handle decides per run:

- every control of the run wants the same single LoRA merged: the patcher carries that
  LoRA as weight patches; the controls run the plain module (a plain ControlNet step);
- anything else (several conditions, or two controls with different LoRAs): the
  patcher carries no patches, and each control applies its adapters at forward time.

Controls join a run's plan with `claim` when ComfyUI starts sampling (before it loads
the models) and `start_run` when sampling begins; they ask `merged_key` which case they
are in; `ensure_loaded` repairs the rare case where something else loaded the module in
between. With ComfyUI's multi-GPU sampling, `on_device` gives each extra device its own
handle (module, patcher and plan).
"""
from __future__ import annotations

import contextlib
import os
import uuid
import weakref
from types import SimpleNamespace
from typing import Any, Hashable, Iterator

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
from ..ctrlora_core.controlnet import CtrLoRAControlNet
from ..ctrlora_core.errors import CheckpointError
from ..ctrlora_core.files import file_stamp
from ..ctrlora_core.formats import load_base

# Dtypes ComfyUI may pick for the base (as for the SD1.5 UNet).
SUPPORTED_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def host_ops(dtype: torch.dtype, manual_cast_dtype: torch.dtype | None) -> SimpleNamespace:
    """ComfyUI's layer classes for this dtype, as core ControlNets get them, and its weight cast.

    GroupNorms always cast their (small) affine weights to the input: the ResBlocks
    normalise in float32 even when the weights are half precision.
    """
    ops = comfy.ops.pick_operations(dtype, manual_cast_dtype, disable_fast_fp8=True)

    class GroupNorm(ops.GroupNorm):
        comfy_cast_weights = True

    return SimpleNamespace(Linear=ops.Linear, Conv2d=ops.Conv2d, GroupNorm=GroupNorm, LayerNorm=ops.LayerNorm,
                           cast_weights=cast_weights)


@contextlib.contextmanager
def cast_weights(layer: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """A comfy.ops layer's weight and bias as its own forward gets them, valid inside the block.

    On `device` in `dtype`, with the weight patches a low-VRAM or dynamic-VRAM load applies
    per cast. Where ComfyUI has `uncast_bias_weight`, the cast may lend buffers that are
    reused after it, so the tensors must not outlive the block.
    """
    if hasattr(comfy.ops, "uncast_bias_weight"):
        weight, bias, state = comfy.ops.cast_bias_weight(layer, dtype=dtype, device=device, bias_dtype=dtype,
                                                         offloadable=True)
        try:
            yield weight, bias
        finally:
            comfy.ops.uncast_bias_weight(layer, weight, bias, state)
    else:
        yield comfy.ops.cast_bias_weight(layer, dtype=dtype, device=device, bias_dtype=dtype)


class BaseHandle:
    """A loaded Base ControlNet (the `CTRLORA_BASE` value) and its per-run merge decision."""

    def __init__(self, module: CtrLoRAControlNet, patcher: Any, path: str, stamp: tuple,
                 weight_dtype: torch.dtype, compute_dtype: torch.dtype):
        self.module = module
        self.patcher = patcher
        self.path = path
        self.stamp = stamp  # the file's file_stamp when it was read
        self.weight_dtype = weight_dtype
        self.compute_dtype = compute_dtype
        self.merged_key: Hashable | None = None  # the LoRA the patcher carries now (None: clean weights)
        self._merged_patches: dict | None = None  # the control's patches the patcher carries for it
        self._claims: dict[Hashable | None, dict | None] = {}
        self._planning = False
        self._device_handles: dict[torch.device, BaseHandle] = {}

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def claim(self, key: Hashable | None, patches: dict[str, Any] | None) -> None:
        """Register a control that uses this base in the coming run (before ComfyUI loads the models).

        `key`/`patches`: the one LoRA the control would like merged, or None when it
        applies adapters at forward time. The first claim after a run started (see
        `start_run`) begins a new plan.
        """
        if not self._planning:
            self._claims = {}
            self._planning = True
        self._plan(key, patches)

    def start_run(self, key: Hashable | None, patches: dict[str, Any] | None) -> None:
        """Sampling started with a control of `key`: the next claim belongs to a new run.

        A control that did not claim (a sampler that skipped that step) joins the plan
        now, so the patcher never carries another control's LoRA while it runs; its
        weights are then reloaded before they are used (`ensure_loaded`).
        """
        if key not in self._claims:
            self._plan(key, patches)
        self._planning = False

    def _plan(self, key: Hashable | None, patches: dict[str, Any] | None) -> None:
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

    def ensure_loaded(self) -> None:
        """Load the patcher (again) unless the module holds exactly its current patches."""
        if getattr(self.module, "current_weight_patches_uuid", None) != self.patcher.patches_uuid:
            mm.load_models_gpu([self.patcher])

    def on_device(self, load_device: torch.device) -> "BaseHandle":
        """This base for another load device (ComfyUI's multi-GPU sampling): its own module,
        patcher and merge plan, read from the file once per device."""
        handle = self._device_handles.get(load_device)
        if handle is None:
            if file_stamp(self.path) != self.stamp:
                raise CheckpointError("changed on disk since it was loaded; run the prompt again to reload it",
                                      self.path)
            handle = _load_handle(self.path, self.stamp, self.weight_dtype, load_device)
            self._device_handles[load_device] = handle
        return handle

    def summary(self) -> str:
        params = sum(p.numel() for p in self.module.parameters())
        return f"{self.name}: {params / 1e6:.1f}M params, {str(self.compute_dtype).replace('torch.', '')}"


_handles: "weakref.WeakValueDictionary[tuple, BaseHandle]" = weakref.WeakValueDictionary()


def load_base_handle(path: str, dtype: torch.dtype | None = None) -> BaseHandle:
    """The shared handle of the base file at `path` (loaded on first use, in ComfyUI's dtype unless given)."""
    stamp = file_stamp(path)
    handle = _handles.get((*stamp, dtype))
    if handle is None:
        weight_dtype = dtype or mm.unet_dtype(model_params=-1, supported_dtypes=SUPPORTED_DTYPES)
        handle = _load_handle(path, stamp, weight_dtype, mm.get_torch_device())
        _handles[(*stamp, dtype)] = handle
    return handle


def _load_handle(path: str, stamp: tuple, weight_dtype: torch.dtype, load_device: torch.device) -> BaseHandle:
    """Read the base in `weight_dtype` onto the offload device, managed for `load_device`."""
    offload_device = mm.unet_offload_device()
    manual_cast_dtype = mm.unet_manual_cast(weight_dtype, load_device)
    module = load_base(path, host_ops=host_ops(weight_dtype, manual_cast_dtype), dtype=weight_dtype,
                       device=offload_device)
    # Looked up now: ComfyUI swaps its core patcher class at start-up when dynamic VRAM is on.
    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = patcher_class(module, load_device=load_device, offload_device=offload_device)
    return BaseHandle(module, patcher, path, stamp, weight_dtype, manual_cast_dtype or weight_dtype)
