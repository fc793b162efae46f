"""ComfyUI nodes of the pack (V1 node API, so old and new ComfyUI load them).

ComfyUI imports the pack as a package named after its folder, so this is `<pack>.nodes`
and never meets ComfyUI's own top-level `nodes` module; every import of the pack's code
is relative (`..ctrlora_core`). Importing this package needs no ComfyUI: `comfy.*` is
imported only inside node functions (and by `base_model` / `ctrlora_control`, which
those functions import).
"""
from .apply import CtrLoRAApply, CtrLoRACondition
from .dental import CtrLoRABlendLightingSeg, CtrLoRADentalPrompt
from .loaders import CtrLoRABaseLoader, CtrLoRABlendLoRAs, CtrLoRALoRALoader
from .model_files import register_folder

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
