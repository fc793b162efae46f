"""Shared pytest setup: the pack is imported the way ComfyUI imports a custom node folder.

Its modules are then importable as `ComfyUI_CtrLoRA.nodes.loaders`, `ComfyUI_CtrLoRA.ctrlora_core...`
(see testbed/comfy_host.py). The library, trainer, demo and test bed are installed by name
(`make venv` runs `pip install -e .`), so tests import them as `ctrlora_core`, `train`, ...
"""
from testbed.comfy_host import load_pack

load_pack()
