"""Dental helper nodes: Blend Lighting + Segmentation (the condition image) and Dental Prompt (the text)."""
from __future__ import annotations

import torch

from ..ctrlora_core.conditions import BLEND_MODES, blend_lighting_seg
from ..ctrlora_core.prompts import DEFAULT_TEMPLATE, JAWS, VIEWS, PromptTemplate

CATEGORY = "CtrLoRA"


class CtrLoRABlendLightingSeg:
    DESCRIPTION = ("Blends a lighting map with a segmentation map of the 3D teeth model into the dental "
                   "condition image: (1 - alpha) * lighting + alpha * mode(lighting, seg).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "blend"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "lighting": ("IMAGE",),
            "segmentation": ("IMAGE",),
            "alpha": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                "tooltip": "0 = lighting only, 1 = the pure blend"}),
            "mode": (list(BLEND_MODES), {"default": "alpha"}),
        }}

    def blend(self, lighting: torch.Tensor, segmentation: torch.Tensor, alpha: float, mode: str) -> tuple:
        return (blend_lighting_seg(lighting, segmentation, alpha, mode),)


class CtrLoRADentalPrompt:
    DESCRIPTION = ("Builds the dental prompt from the jaw and the view (or parses both from a file name "
                   "like upper_front_0001.png); connect it to CLIP Text Encode's text.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    FUNCTION = "prompt"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "jaw": (list(JAWS),),
                "view": (list(VIEWS),),
                "template": ("STRING", {"default": DEFAULT_TEMPLATE, "multiline": True,
                                        "tooltip": "Placeholders {jaw} and {view}"}),
            },
            "optional": {"file_name": ("STRING", {"default": "", "tooltip": (
                "When set, jaw and view are parsed from it (e.g. lower_left_0012.png)")})},
        }

    def prompt(self, jaw: str, view: str, template: str, file_name: str = "") -> tuple[str]:
        template_ = PromptTemplate(template)
        if file_name:  # as the web panel (web/lib/prompt.js): any non-empty name is parsed
            return (template_.for_file(file_name),)
        return (template_.render(jaw, view),)
