"""Nodes that put conditions on the conditioning: CtrLoRA Condition and Apply CtrLoRA."""
from __future__ import annotations

from typing import Any

import torch

from ..ctrlora_core.conditions import check_unit_range
from ..ctrlora_core.errors import release_on_error

from .block_weights import BLOCK_WEIGHTINGS
from .handles import BASE_TYPE, CONDITIONS_TYPE, LORA_TYPE, Condition, LoRAHandle

CATEGORY = "CtrLoRA"


def _rgb(image: torch.Tensor) -> torch.Tensor:
    """A ComfyUI IMAGE (BHWC in [0, 1]) with 3 channels: gray repeated, alpha dropped."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image: expected a ComfyUI IMAGE [batch, height, width, 1|3|4], got {tuple(image.shape)}")
    check_unit_range(image, "image")
    if image.shape[-1] == 1:
        return image.expand(*image.shape[:-1], 3)
    return image[..., :3]


class CtrLoRACondition:
    DESCRIPTION = ("One condition for Apply CtrLoRA: a condition LoRA, its condition image and its weight. "
                   "Chain them (previous) to stack any number of conditions on one Base ControlNet.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (CONDITIONS_TYPE,)
    RETURN_NAMES = ("conditions",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "lora": (LORA_TYPE,),
                "image": ("IMAGE", {"tooltip": "Condition image in [0, 1] (it is resized to the latent like a "
                                               "ControlNet hint and encoded with the VAE)"}),
                "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.01,
                                     "tooltip": "Weight of this condition in the sum of residuals"}),
            },
            "optional": {"previous": (CONDITIONS_TYPE, {"tooltip": "Conditions to add this one to"})},
        }

    def add(self, lora: LoRAHandle, image: torch.Tensor, weight: float,
            previous: tuple[Condition, ...] | None = None) -> tuple[tuple[Condition, ...]]:
        if not isinstance(lora, LoRAHandle):
            raise TypeError("lora: connect a 'Load CtrLoRA LoRA' or 'Blend CtrLoRA LoRAs' node")
        return (tuple(previous or ()) + (Condition(lora, _rgb(image), weight),),)


class CtrLoRAApply:
    DESCRIPTION = ("Applies a Base ControlNet with its conditions to the conditioning (like Apply ControlNet; "
                   "chains with it before or after). One condition runs at the cost of a plain ControlNet; "
                   "N conditions share one copy of the base.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        percent = {"min": 0.0, "max": 1.0, "step": 0.001}
        return {
            "required": {
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "base": (BASE_TYPE,),
                "conditions": (CONDITIONS_TYPE,),
                "vae": ("VAE", {"tooltip": "The SD VAE: it encodes the condition images"}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                "start_percent": ("FLOAT", {"default": 0.0, **percent}),
                "end_percent": ("FLOAT", {"default": 1.0, **percent}),
            },
            "optional": {
                "apply_to_uncond": ("BOOLEAN", {"default": True, "tooltip": (
                    "Also control the negative (uncond) pass, as the official CtrLoRA does")}),
                "block_weighting": (list(BLOCK_WEIGHTINGS), {"default": "constant", "tooltip": (
                    "constant; soft = 0.825^(12-i) per block (ControlNet soft injection); resolution = 64/h_i "
                    "(ControlNet paper's CFG resolution weighting, meant with apply_to_uncond off)")}),
                "residual_cache": ("BOOLEAN", {"default": True, "tooltip": (
                    "Keep computed residuals for later runs: the Base ControlNet never sees the noisy latent, so "
                    "a re-run with another seed (same steps, sampler, scheduler, prompt, images) reuses them. "
                    "Bounded by CTRLORA_RESIDUAL_CACHE_MB (default 1024; 0 turns it off for the server)")}),
            },
        }

    @release_on_error  # it reads the LoRAs: a refusal keeps none of them in its traceback
    def apply(self, positive: list, negative: list, base: Any, conditions: tuple[Condition, ...], vae: Any,
              strength: float, start_percent: float, end_percent: float, apply_to_uncond: bool = True,
              block_weighting: str = "constant", residual_cache: bool = True) -> tuple[list, list]:
        if strength == 0:
            return positive, negative
        from .ctrlora_control import CtrLoRAControl  # needs ComfyUI

        control = CtrLoRAControl.build(base, conditions, vae, strength, (start_percent, end_percent),
                                       block_weighting, residual_cache)
        per_previous: dict[Any, Any] = {}  # one control per distinct previous control, shared by pos/neg

        def attach(conditioning: list) -> list:
            out = []
            for tensor, options in conditioning:
                options = options.copy()
                previous = options.get("control")
                if previous not in per_previous:
                    per_previous[previous] = control.copy().set_previous_controlnet(previous)
                options["control"] = per_previous[previous]
                options["control_apply_to_uncond"] = False
                out.append([tensor, options])
            return out

        return attach(positive), attach(negative) if apply_to_uncond else negative
