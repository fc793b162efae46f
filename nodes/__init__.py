"""ComfyUI nodes of the pack (V1 node API). `comfy.*` is imported lazily inside the nodes."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
