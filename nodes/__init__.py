"""ComfyUI nodes of the pack (V1 node API, so old and new ComfyUI load them).

Importing this package needs no ComfyUI: `comfy.*` is imported only inside node
functions (and by `base_model` / `ctrlora_control`, which those functions import).
Inside ComfyUI the pack is imported as a package named after its folder, which does
not put the pack's folder on sys.path; it is appended here so `ctrlora_core` (shared
with the trainer and scripts) imports as a top-level package.
"""
import os
import sys

_PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _PACK_ROOT not in sys.path:
    sys.path.append(_PACK_ROOT)

from .apply import CtrLoRAApply, CtrLoRACondition  # noqa: E402
from .dental import CtrLoRABlendLightingSeg, CtrLoRADentalPrompt  # noqa: E402
from .loaders import CtrLoRABaseLoader, CtrLoRABlendLoRAs, CtrLoRALoRALoader  # noqa: E402
from .model_files import register_folder  # noqa: E402

NODE_CLASS_MAPPINGS = {
    "CtrLoRABaseLoader": CtrLoRABaseLoader,
    "CtrLoRALoRALoader": CtrLoRALoRALoader,
    "CtrLoRABlendLoRAs": CtrLoRABlendLoRAs,
    "CtrLoRACondition": CtrLoRACondition,
    "CtrLoRAApply": CtrLoRAApply,
    "CtrLoRABlendLightingSeg": CtrLoRABlendLightingSeg,
    "CtrLoRADentalPrompt": CtrLoRADentalPrompt,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "CtrLoRABaseLoader": "Load CtrLoRA Base ControlNet",
    "CtrLoRALoRALoader": "Load CtrLoRA LoRA",
    "CtrLoRABlendLoRAs": "Blend CtrLoRA LoRAs",
    "CtrLoRACondition": "CtrLoRA Condition",
    "CtrLoRAApply": "Apply CtrLoRA",
    "CtrLoRABlendLightingSeg": "Blend Lighting + Segmentation",
    "CtrLoRADentalPrompt": "Dental Prompt",
}

try:
    import folder_paths  # ComfyUI's module
except ImportError:  # outside ComfyUI
    pass
else:  # register models/ctrlora now, so every model listing (and the info route) knows it
    register_folder(folder_paths)
