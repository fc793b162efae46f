"""The pack's nodes import without ComfyUI and declare valid V1 node definitions matching the published contract."""
from __future__ import annotations

import inspect

import pytest

from ComfyUI_CtrLoRA import nodes as pack

# The published node ids and their inputs (brief: "Stable node IDs and inputs").
CONTRACT = {
    "CtrLoRABaseLoader": ("Load CtrLoRA Base ControlNet", ["base_name"], [], ("CTRLORA_BASE",)),
    "CtrLoRALoRALoader": ("Load CtrLoRA LoRA", ["lora_name", "strength"], [], ("CTRLORA_LORA",)),
    "CtrLoRABlendLoRAs": ("Blend CtrLoRA LoRAs", ["lora_1", "weight_1", "lora_2", "weight_2"],
                          ["lora_3", "weight_3", "lora_4", "weight_4", "rank", "save_name"], ("CTRLORA_LORA",)),
    "CtrLoRACondition": ("CtrLoRA Condition", ["lora", "image", "weight"], ["previous"], ("CTRLORA_CONDITIONS",)),
    "CtrLoRAApply": ("Apply CtrLoRA", ["positive", "negative", "base", "conditions", "vae", "strength",
                                       "start_percent", "end_percent"], ["apply_to_uncond", "block_weighting", "residual_cache"],
                     ("CONDITIONING", "CONDITIONING")),
    "CtrLoRABlendLightingSeg": ("Blend Lighting + Segmentation", ["lighting", "segmentation", "alpha", "mode"],
                                ["lighting_mask", "segmentation_mask"], ("IMAGE",)),
    "CtrLoRADentalPrompt": ("Dental Prompt", ["jaw", "view", "template"], ["file_name"], ("STRING",)),
}
SOCKET_TYPES = {"CTRLORA_BASE", "CTRLORA_LORA", "CTRLORA_CONDITIONS", "CONDITIONING", "VAE", "IMAGE", "MASK"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def test_mappings_cover_the_contract():
    assert set(pack.NODE_CLASS_MAPPINGS) == set(CONTRACT)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {k: v[0] for k, v in CONTRACT.items()}


def test_top_level_package_reexports_the_mappings(monkeypatch):
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("ComfyUI_CtrLoRA_under_test", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)  # as ComfyUI imports a pack: a package named after its folder
    assert set(module.NODE_CLASS_MAPPINGS) == set(CONTRACT)
    assert os.path.isdir(os.path.join(root, module.WEB_DIRECTORY))


@pytest.mark.parametrize("node_type", sorted(CONTRACT))
def test_node_definition_is_valid(node_type):
    cls = pack.NODE_CLASS_MAPPINGS[node_type]
    _, required, optional, returns = CONTRACT[node_type]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    assert list(spec["required"]) == required
    assert list(spec.get("optional", {})) == optional
    assert cls.RETURN_TYPES == returns
    assert len(getattr(cls, "RETURN_NAMES", returns)) == len(returns)
    assert cls.CATEGORY == "CtrLoRA" and cls.DESCRIPTION

    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, name
            kind, options = entry[0], (entry[1] if len(entry) == 2 else {})
            assert isinstance(options, dict), name
            if isinstance(kind, list):  # combo: file lists are empty outside ComfyUI, others are not
                assert all(isinstance(v, str) for v in kind)
                assert kind or name in ("base_name", "lora_name"), name
                assert "default" not in options or options["default"] in kind, name
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], name
            else:
                assert kind in WIDGET_TYPES | SOCKET_TYPES, (name, kind)

    function = getattr(cls, cls.FUNCTION)
    parameters = inspect.signature(function).parameters
    for name in required:
        assert name in parameters and parameters[name].default is inspect.Parameter.empty, name
    for name in optional:
        assert name in parameters and parameters[name].default is not inspect.Parameter.empty, name
