"""Apply CtrLoRA's control object: a ComfyUI `ControlBase` running one Base ControlNet for N conditions.

Per model call ComfyUI asks every control in the conditioning for residuals
(`get_control`). This one:

1. encodes each condition image with the SD VAE once per run: resized like core
   ControlNet hints (centre crop to the latent's aspect, latent size x 8 pixels),
   given to the encoder in [0, 1] (the official quirk: `VAE.encode` maps x to 2x - 1,
   so it gets (x + 1) / 2), then scaled by 0.18215; a batch-1 hint is expanded to the
   cond/uncond batch;
2. runs the Base ControlNet on the condition latents, the timestep
   (`model_sampling.timestep(sigma)`) and the text context; the noisy latent is never
   an input. With one condition whose LoRA the base handle merged for this run, the
   plain module runs (exactly a plain ControlNet step); otherwise the N conditions go
   through the module as one adapter-major batch with their adapters applied at
   forward time, and the residuals come back summed with the condition weights;
3. applies the block weighting, returns {"output": 12, "middle": 1} residuals merged
   with the previous control in the chain (core `control_merge`: x strength, + prev).

Chaining with core Apply ControlNet works both ways because this is an ordinary
ControlBase: it calls its `previous_controlnet` and core controls call it.
"""
from __future__ import annotations

from typing import Any, Hashable, Sequence

import torch

import comfy.controlnet
import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
from ..ctrlora_core.adapter_stack import AdapterStack
from ..ctrlora_core.adapters import stack_adapters

from .base_model import BaseHandle
from .block_weights import BLOCK_WEIGHTINGS, block_multipliers
from .handles import Condition

try:  # ComfyUI >= 0.3.30: weight adapters (the legacy ("lora", ...) tuple is ignored since then)
    from comfy.weight_adapter import LoRAAdapter
except ImportError:  # older ComfyUI: no merged fast path, adapters at forward time (always correct)
    LoRAAdapter = None


def merge_patches(stack: AdapterStack) -> dict[str, Any]:
    """ModelPatcher weight patches that merge a one-adapter stack (strength already folded into up)."""
    patches: dict[str, Any] = {}
    for module, (down_t, up_t) in stack.lora.items():  # [1, in, r], [1, r, out]
        patches[module + ".weight"] = LoRAAdapter(set(), (up_t[0].t(), down_t[0].t(), None, None, None, None))
    for module, (weight, bias) in stack.sets.items():
        patches[module + ".weight"] = ("set", (weight[0],))
        patches[module + ".bias"] = ("set", (bias[0],))
    return patches


def _move_stack(stack: AdapterStack, device: torch.device, dtype: torch.dtype) -> AdapterStack:
    """A copy of `stack` on the sampling device, owned by one run (dropped in cleanup)."""
    def move(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return pair[0].to(device, dtype), pair[1].to(device, dtype)

    return AdapterStack(lora={k: move(v) for k, v in stack.lora.items()},
                        sets={k: move(v) for k, v in stack.sets.items()}, weights=stack.weights)


class CtrLoRAControl(comfy.controlnet.ControlBase):
    """Base ControlNet + N conditions, as one control in ComfyUI's chain."""

    def __init__(self, base: BaseHandle, images: Sequence[torch.Tensor], stack: AdapterStack,
                 merge_key: Hashable | None, vae: Any, block_weighting: str):
        super().__init__()
        self.base = base
        self.images = list(images)  # BHWC in [0, 1], one per condition
        self.stack = stack  # CPU float32; weights = condition weights
        self.merge_key = merge_key  # (LoRA identity, strength) when a merge is possible, else None
        self.vae = vae
        self.latent_format = comfy.latent_formats.SD15()
        self.block_weighting = block_weighting
        self.model_sampling = None
        self._latents: list[torch.Tensor] | None = None  # per run: condition latents at the current size
        self._run_stack: AdapterStack | None = None
        if not hasattr(self, "multigpu_clones"):  # ComfyUI without multi-GPU sampling: deepclone_multigpu's registry
            self.multigpu_clones: dict[torch.device, CtrLoRAControl] = {}

    @classmethod
    def build(cls, base: BaseHandle, conditions: Sequence[Condition], vae: Any, strength: float,
              percent_range: tuple[float, float], block_weighting: str) -> "CtrLoRAControl":
        """Check the inputs, read the LoRAs and stack them; raises with a message for the UI."""
        if not isinstance(base, BaseHandle):
            raise TypeError("base: connect a 'Load CtrLoRA Base ControlNet' node")
        if not conditions:
            raise ValueError("conditions: the list is empty; connect a 'CtrLoRA Condition' node")
        if vae is None:
            raise ValueError("vae: Apply CtrLoRA needs the SD VAE (the condition image is encoded with it); "
                             "connect the checkpoint's VAE output")
        if getattr(vae, "latent_channels", 4) != 4:
            raise ValueError(f"vae: expected an SD1.x VAE with 4 latent channels, got {vae.latent_channels}")
        if block_weighting not in BLOCK_WEIGHTINGS:
            raise ValueError(f"block_weighting {block_weighting!r}: expected one of {', '.join(BLOCK_WEIGHTINGS)}")
        for condition in conditions:  # every LoRA is checked (from its header) before any is read
            condition.lora.check_against(base.module)
        adapters = [condition.lora.load() for condition in conditions]
        stack = stack_adapters(adapters, [c.weight for c in conditions], [c.lora.strength for c in conditions])
        single = conditions[0].lora
        merge_key = (single.identity, single.strength) if len(conditions) == 1 and LoRAAdapter else None
        control = cls(base, [c.image for c in conditions], stack, merge_key, vae, block_weighting)
        control.strength = strength
        control.timestep_percent_range = percent_range
        return control

    # ---- ComfyUI's ControlBase interface

    def copy(self) -> "CtrLoRAControl":
        c = CtrLoRAControl(self.base, self.images, self.stack, self.merge_key, self.vae, self.block_weighting)
        self.copy_to(c)
        return c

    def deepclone_multigpu(self, load_device: torch.device, autoregister: bool = False) -> "CtrLoRAControl":
        """This control for another device of ComfyUI's multi-GPU sampling: the base's copy on that device."""
        c = self.copy()
        c.base = self.base.on_device(load_device)
        if autoregister:
            self.multigpu_clones[load_device] = c
        return c

    def get_models(self) -> list:
        # Pure: newer ComfyUI also calls it on every node output while the graph runs, not only to sample.
        return super().get_models() + [self.base.patcher]

    def inference_memory_requirements(self, dtype: torch.dtype) -> int:
        # ComfyUI calls this only when sampling starts, after get_models and before loading the models:
        # the moment this control (and its copies on other devices) joins the run's merge plan.
        for control in (self, *self.multigpu_clones.values()):
            control.base.claim(control.merge_key, control._merge_patches())
        own = 0 if self.merge_key is not None else self.stack.numel() * mm.dtype_size(self.base.compute_dtype)
        return own + super().inference_memory_requirements(dtype)

    def pre_run(self, model: Any, percent_to_timestep_function: Any) -> None:
        super().pre_run(model, percent_to_timestep_function)
        self.model_sampling = model.model_sampling
        self.base.start_run(self.merge_key, self._merge_patches())

    def cleanup(self) -> None:
        self.model_sampling = None
        self._latents = None
        self._run_stack = None
        super().cleanup()

    def _merge_patches(self) -> dict[str, Any] | None:
        return merge_patches(self.stack) if self.merge_key is not None else None

    def get_control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict, batched_number: int,
                    transformer_options: dict) -> dict | None:
        previous = None
        if self.previous_controlnet is not None:
            previous = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if self.timestep_range is not None and not (self.timestep_range[1] <= t[0] <= self.timestep_range[0]):
            return previous

        device, dtype = x_noisy.device, self.base.compute_dtype
        hint = self._hint(x_noisy, batched_number).to(device, dtype)
        context = mm.cast_to_device(cond.get("crossattn_controlnet", cond["c_crossattn"]), device, dtype)
        timestep = self.model_sampling.timestep(t).to(device)
        self.base.ensure_loaded()
        with torch.no_grad():
            if self.merge_key is not None and self.base.merged_key == self.merge_key:
                residuals = self.base.module(hint, timestep, context)
                condition_weight = float(self.stack.weights[0])
            else:
                if self._run_stack is None:
                    self._run_stack = _move_stack(self.stack, device, dtype)
                residuals = self.base.module(hint, timestep, context, adapters=self._run_stack)
                condition_weight = 1.0  # already in the weighted sum
        for residual, factor in zip(residuals, block_multipliers(self.block_weighting, residuals, x_noisy.shape[-2])):
            if factor * condition_weight != 1.0:
                residual.mul_(factor * condition_weight)
        control = {"output": residuals[:-1], "middle": residuals[-1:]}
        return self.control_merge(control, previous, output_dtype=None)

    # ---- condition latents

    def _hint(self, x_noisy: torch.Tensor, batched_number: int) -> torch.Tensor:
        """Condition latents for this call: [N * B, 4, h, w], condition-major."""
        height, width = x_noisy.shape[-2:]
        if self._latents is None or self._latents[0].shape[-2:] != (height, width):
            self._latents = self._encode(height, width)
        batch = x_noisy.shape[0]
        parts = []
        for latent in self._latents:
            if latent.shape[0] == 1:
                parts.append(latent.expand(batch, -1, -1, -1))
            else:
                parts.append(comfy.controlnet.broadcast_image_to(latent, batch, batched_number))
        return torch.cat(parts)

    def _encode(self, height: int, width: int) -> list[torch.Tensor]:
        """VAE latents (x 0.18215) of the condition images resized to the latent's size x 8."""
        ratio = self.vae.spacial_compression_encode()
        still_loaded = mm.loaded_models(only_currently_used=True)
        latents = []
        for image in self.images:
            pixels = comfy.utils.common_upscale(image.movedim(-1, 1), width * ratio, height * ratio,
                                                self.upscale_algorithm, "center")
            latent = self.vae.encode(((pixels + 1) / 2).movedim(1, -1))
            latents.append(self.latent_format.process_in(latent))
        mm.load_models_gpu(still_loaded)
        return latents
