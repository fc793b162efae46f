"""Dental helper nodes: Blend Lighting + Segmentation (the condition image) and Dental Prompt (the text)."""
from __future__ import annotations

import torch

from ..ctrlora_core.conditions import (
    BLEND_MODES,
    DENTAL_BLEND_ALPHA,
    DENTAL_PALETTE,
    blend_lighting_seg,
    flatten_alpha,
)
from ..ctrlora_core.prompts import DEFAULT_TEMPLATE, JAWS, VIEWS, PromptTemplate

CATEGORY = "CtrLoRA"


def _flatten(image: torch.Tensor, mask: torch.Tensor | None, background: tuple[int, int, int]) -> torch.Tensor:
    """`image` over a flat colour where Load Image's mask says it is transparent.

    Load Image gives a 64x64 zero mask for a file without alpha; a mask of another
    size than the image that is all zero therefore means "opaque".
    """
    if mask is None or (mask.shape[-2:] != image.shape[-3:-1] and not bool(mask.any())):
        return image
    return flatten_alpha(image, mask, background)


class CtrLoRABlendLightingSeg:
    DESCRIPTION = ("Blends a lighting map with a segmentation map of the 3D teeth model into the dental "
                   "condition image: (1 - alpha) * lighting + alpha * mode(lighting, seg). Connect Load "
                   "Image's masks for transparent renders: the segmentation is then flattened over the palette "
                   "background, the lighting over black, as the trainer does.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "blend"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        mask_tip = "Load Image's mask of the {} file (transparent pixels get the {} colour)"
        return {
            "required": {
                "lighting": ("IMAGE",),
                "segmentation": ("IMAGE",),
                "alpha": ("FLOAT", {"default": DENTAL_BLEND_ALPHA, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "0 = lighting only, 1 = the pure blend; 0.3 = segmentation at "
                                               "30 % opacity, the dental recipe"}),
                "mode": (list(BLEND_MODES), {"default": "alpha"}),
            },
            "optional": {
                "lighting_mask": ("MASK", {"tooltip": mask_tip.format("lighting", "black")}),
                "segmentation_mask": ("MASK", {"tooltip": mask_tip.format("segmentation", "palette background")}),
            },
        }

    def blend(self, lighting: torch.Tensor, segmentation: torch.Tensor, alpha: float, mode: str,
              lighting_mask: torch.Tensor | None = None, segmentation_mask: torch.Tensor | None = None) -> tuple:
        lighting = _flatten(lighting, lighting_mask, (0, 0, 0))
        segmentation = _flatten(segmentation, segmentation_mask, DENTAL_PALETTE["background"])
        return (blend_lighting_seg(lighting, segmentation, alpha, mode),)


class CtrLoRADentalPrompt:
    DESCRIPTION = ("Builds the dental prompt from the jaw and the view (or parses them from a file name like "
                   "lighting_upper_AB12_front_top_left.png); connect it to CLIP Text Encode's text.")
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
                                        "tooltip": "Placeholders {jaw}, {view} and {view_detail} (the direction "
                                                   "words after the view in a file name, e.g. 'top left')"}),
            },
            "optional": {"file_name": ("STRING", {"default": "", "tooltip": (
                "When set, jaw, view and view detail are parsed from it: the jaw word (upper/lower, "
                "maxilla/mandible) and the first view word after it, anywhere in the name, e.g. "
                "seg_lower_patient7_front_slightly_up.png")})},
        }

    def prompt(self, jaw: str, view: str, template: str, file_name: str = "") -> tuple[str]:
        template_ = PromptTemplate(template)
        if file_name.strip():  # as the web panel (web/lib/prompt.js): a blank name keeps the widgets
            return (template_.for_file(file_name.strip()),)
        return (template_.render(jaw, view),)
