"""Apply CtrLoRA's control object: a ComfyUI `ControlBase` running one Base ControlNet for N conditions.

Per model call ComfyUI asks every control in the conditioning for residuals
(`get_control`). This one:

1. encodes each condition image with the SD VAE once per run: resized like core
   ControlNet hints (centre crop to the latent's aspect, latent size x 8 pixels),
   given to the encoder in [0, 1] (the official quirk: `VAE.encode` maps x to 2x - 1,
   so it gets (x + 1) / 2), then scaled by 0.18215; a batch-1 hint serves every row;
2. runs the Base ControlNet on the condition latents, the timestep
   (`model_sampling.timestep(sigma)`) and the text context; the noisy latent is never
   an input. With one condition whose LoRA the base handle merged for this run, the
   plain module runs (exactly a plain ControlNet step); otherwise the N conditions go
   through the module as one adapter-major batch with their adapters applied at
   forward time, and the residuals come back summed with the condition weights;
   block weighting is applied to what comes out;
3. returns {"output": 12, "middle": 1} residuals merged with the previous control in
   the chain (core `control_merge`: x strength, + prev).

Since the noisy latent is not an input, step 2 runs once per distinct row input
(condition latent rows, timestep, context): a batch of B images sharing a prompt costs
the rows of one image, and each row gets its own copy of the result. With the residual
cache on (`residual_cache.SHARED`, Apply CtrLoRA's `residual_cache` input), rows whose
inputs a previous run already met (a re-queue with a new seed) are copied from it, and
so are condition latents already encoded.

Chaining with core Apply ControlNet works both ways because this is an ordinary
ControlBase: it calls its `previous_controlnet` and core controls call it.
"""
from __future__ import annotations

import ctypes
import sys
from typing import Any, Hashable, NamedTuple, Sequence

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
from .residual_cache import SHARED, distinct_rows, tensor_digest

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


def return_freed_heap() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    A LoRA file is read as hundreds of ~1 MB tensors; once they are stacked and dropped, glibc
    keeps most of those blocks in the process (measured: ~300 MB kept after stacking three
    rank-128 LoRAs, for a 420 MB stack), so the resident memory of the server would stay high.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl has no malloc_trim)
            pass


def _move_stack(stack: AdapterStack, device: torch.device, dtype: torch.dtype) -> AdapterStack:
    """A copy of `stack` on the sampling device, owned by one run (dropped in cleanup)."""
    def move(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return pair[0].to(device, dtype), pair[1].to(device, dtype)

    return AdapterStack(lora={k: move(v) for k, v in stack.lora.items()},
                        sets={k: move(v) for k, v in stack.sets.items()}, weights=stack.weights)


class ConditionKey(NamedTuple):
    """What the residuals owe to one condition (a part of the residual cache's keys)."""

    lora: Hashable  # the LoRA's identity
    strength: float
    weight: float
    image: str  # content hash of the condition image


class CtrLoRAControl(comfy.controlnet.ControlBase):
    """Base ControlNet + N conditions, as one control in ComfyUI's chain."""

    def __init__(self, base: BaseHandle, images: Sequence[torch.Tensor], stack: AdapterStack,
                 merge_key: Hashable | None, vae: Any, block_weighting: str,
                 reuse: tuple[ConditionKey, ...] | None = None):
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
        self.reuse = reuse  # the conditions' part of residual cache keys; None: the cache is off
        self._context_digests: list[tuple[torch.Tensor, str]] = []  # per run: context rows met and their hashes
        if not hasattr(self, "multigpu_clones"):  # ComfyUI without multi-GPU sampling: deepclone_multigpu's registry
            self.multigpu_clones: dict[torch.device, CtrLoRAControl] = {}

    @classmethod
    def build(cls, base: BaseHandle, conditions: Sequence[Condition], vae: Any, strength: float,
              percent_range: tuple[float, float], block_weighting: str,
              residual_cache: bool = True) -> "CtrLoRAControl":
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
        stack = stack_adapters([c.lora.load() for c in conditions], [c.weight for c in conditions],
                               [c.lora.strength for c in conditions])
        return_freed_heap()  # the files' tensors are gone now: only the stacked copies stay
        single = conditions[0].lora
        merge_key = (single.identity, single.strength) if len(conditions) == 1 and LoRAAdapter else None
        reuse = None
        if residual_cache and SHARED.enabled:
            reuse = tuple(ConditionKey(c.lora.identity, c.lora.strength, c.weight, tensor_digest(c.image))
                          for c in conditions)
        control = cls(base, [c.image for c in conditions], stack, merge_key, vae, block_weighting, reuse)
        control.strength = strength
        control.timestep_percent_range = percent_range
        return control

    # ---- ComfyUI's ControlBase interface

    def copy(self) -> "CtrLoRAControl":
        c = CtrLoRAControl(self.base, self.images, self.stack, self.merge_key, self.vae, self.block_weighting,
                           self.reuse)
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
        if self._latents is None or self._latents[0].shape[-2:] != x_noisy.shape[-2:]:
            self._latents = [latent.to(device, dtype) for latent in self._encode(*x_noisy.shape[-2:])]
            self._context_digests = []
        context = mm.cast_to_device(cond.get("crossattn_controlnet", cond["c_crossattn"]), device, dtype)
        timestep = self.model_sampling.timestep(t).to(device)
        hint_rows = self._hint_rows(x_noisy.shape[0], batched_number)
        row_keys = list(zip(*hint_rows, timestep.tolist()))  # with the context row: all a row's residuals depend on
        firsts, inverse = distinct_rows(row_keys, context)
        residuals = self._distinct_residuals(firsts, hint_rows, row_keys, timestep, context, x_noisy.shape[-2:])
        if inverse != list(range(len(inverse))):  # every row its own tensor: ComfyUI scales them in place
            index = torch.tensor(inverse, device=device)
            residuals = [r.index_select(0, index) for r in residuals]
        control = {"output": residuals[:-1], "middle": residuals[-1:]}
        return self.control_merge(control, previous, output_dtype=None)

    def _distinct_residuals(self, firsts: list[int], hint_rows: list[list[int]], row_keys: list[tuple],
                            timestep: torch.Tensor, context: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor]:
        """Residuals of the rows `firsts`, [len(firsts), C, h, w] each: from the cache, else computed."""
        device, dtype = context.device, context.dtype
        merged = self.merge_key is not None and self.base.merged_key == self.merge_key
        keys: list[tuple | None] = [None] * len(firsts)
        if self.reuse is not None:
            prefix = ((SHARED.owner_token(self.base), SHARED.owner_token(self.vae)), self.reuse, merged,
                      self.block_weighting, str(dtype), str(device), tuple(size), self.upscale_algorithm,
                      bool(getattr(self.base.module, "model_lowvram", False)))
            keys = [(*prefix, row_keys[row], self._context_digest(context[row])) for row in firsts]
        parts = [None if key is None else SHARED.get(key) for key in keys]
        missing = [i for i, part in enumerate(parts) if part is None]
        if missing:
            rows = [firsts[i] for i in missing]
            computed = self._residuals([[h[r] for r in rows] for h in hint_rows], timestep[rows], context[rows],
                                       merged, size[0])
            offload = mm.unet_offload_device()
            for j, i in enumerate(missing):
                parts[i] = [r[j:j + 1] for r in computed]
                if keys[i] is not None:
                    SHARED.put(keys[i], [r.to(offload, copy=True) for r in parts[i]])
            if len(missing) == len(firsts):
                return computed
        return [torch.cat([part[level].to(device) for part in parts]) for level in range(len(parts[0]))]

    def _residuals(self, hint_rows: list[list[int]], timestep: torch.Tensor, context: torch.Tensor, merged: bool,
                   latent_height: int) -> list[torch.Tensor]:
        """Residuals of the given rows (hint row per condition, timestep, context), weighted per block."""
        hint = torch.cat([latent[rows] for latent, rows in zip(self._latents, hint_rows)])  # condition-major
        self.base.ensure_loaded()
        with torch.no_grad():
            if merged:
                residuals = self.base.module(hint, timestep, context)
                condition_weight = float(self.stack.weights[0])
            else:
                if self._run_stack is None:
                    self._run_stack = _move_stack(self.stack, hint.device, hint.dtype)
                residuals = self.base.module(hint, timestep, context, adapters=self._run_stack)
                condition_weight = 1.0  # already in the weighted sum
        for residual, factor in zip(residuals, block_multipliers(self.block_weighting, residuals, latent_height)):
            if factor * condition_weight != 1.0:
                residual.mul_(factor * condition_weight)
        return residuals

    # ---- condition latents and text contexts

    def _hint_rows(self, batch: int, batched_number: int) -> list[list[int]]:
        """Per condition, the row of its latents each of the `batch` rows uses (as core ControlNet hints)."""
        rows = []
        for latent in self._latents:
            if latent.shape[0] == 1:
                rows.append([0] * batch)
            else:
                rows.append(comfy.controlnet.broadcast_image_to(torch.arange(latent.shape[0]), batch,
                                                                batched_number).tolist())
        return rows

    def _context_digest(self, context_row: torch.Tensor) -> str:
        """Content hash of one context row, hashed once per run (a run meets few distinct prompts)."""
        for row, digest in self._context_digests:
            if torch.equal(row, context_row):
                return digest
        digest = tensor_digest(context_row)
        self._context_digests.append((context_row, digest))
        return digest

    def _encode(self, height: int, width: int) -> list[torch.Tensor]:
        """VAE latents (x 0.18215) of the condition images resized to the latent's size x 8.

        With the residual cache on, latents of an image already encoded at this size come from it.
        """
        ratio = self.vae.spacial_compression_encode()
        still_loaded = None
        latents = []
        for i, image in enumerate(self.images):
            key = None
            if self.reuse is not None:
                key = ((SHARED.owner_token(self.vae),), "latent", self.reuse[i].image, height, width,
                       self.upscale_algorithm)
                stored = SHARED.get(key)
                if stored is not None:
                    latents.append(stored[0])
                    continue
            if still_loaded is None:
                still_loaded = mm.loaded_models(only_currently_used=True)
            pixels = comfy.utils.common_upscale(image.movedim(-1, 1), width * ratio, height * ratio,
                                                self.upscale_algorithm, "center")
            latent = self.latent_format.process_in(self.vae.encode(((pixels + 1) / 2).movedim(1, -1)))
            if key is not None:
                SHARED.put(key, [latent.to(mm.unet_offload_device(), copy=True)])
            latents.append(latent)
        if still_loaded is not None:
            mm.load_models_gpu(still_loaded)
        return latents
