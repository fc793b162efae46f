"""ComfyUI-CtrLoRA: ComfyUI entry point.

ComfyUI imports this file from custom_nodes/. It must import cleanly without ComfyUI
present (tests and the trainer import the pack on its own), so every `comfy.*` import
lives inside the node functions.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.info_route import register_routes

WEB_DIRECTORY = "./web"

# GET /ctrlora/info for the front end's metadata panels; a no-op outside ComfyUI.
register_routes()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
