"""The example workflows (UI format) use only known node types with the right widget counts and
well-typed links, convert to API format, and each has a .jpg thumbnail for the template browser."""
from __future__ import annotations

import glob
import json
import os

import pytest
from PIL import Image

from ComfyUI_CtrLoRA import nodes as pack
from testbed.workflow_api import CORE_NODES, FRONTEND_ONLY, WorkflowError, slots_from_input_types, to_api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS]


def slots_of(node_type: str) -> list[str]:
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]["slots"]
    return slots_from_input_types(pack.NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES())


def output_types(node_type: str) -> list[str]:
    if node_type in CORE_NODES:
        return CORE_NODES[node_type]["outputs"]
    return list(pack.NODE_CLASS_MAPPINGS[node_type].RETURN_TYPES)


def load(name: str) -> dict:
    with open(os.path.join(ROOT, "example_workflows", f"{name}.json")) as f:
        return json.load(f)


def test_the_three_examples_exist():
    assert NAMES == ["dental_multi_condition", "dental_single_condition", "lora_blending"]


@pytest.mark.parametrize("name", NAMES)
def test_only_known_nodes_with_the_right_widget_counts(name):
    workflow = load(name)
    types = {node["type"] for node in workflow["nodes"]}
    assert types <= set(pack.NODE_CLASS_MAPPINGS) | set(CORE_NODES) | set(FRONTEND_ONLY)
    assert {"CtrLoRAApply", "CtrLoRABaseLoader", "CtrLoRACondition"} <= types
    prompt = to_api(workflow, slots_of)  # raises WorkflowError on a wrong widget count or a broken link
    assert len(prompt) == len([n for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY])
    for node in prompt.values():  # every required input is given (as a widget value or a link)
        if node["class_type"] in pack.NODE_CLASS_MAPPINGS:
            required = pack.NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()["required"]
            assert set(required) <= set(node["inputs"]), node


@pytest.mark.parametrize("name", NAMES)
def test_links_connect_matching_types(name):
    workflow = load(name)
    nodes_by_id = {node["id"]: node for node in workflow["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        source, target = nodes_by_id[src], nodes_by_id[dst]
        assert output_types(source["type"])[src_slot] == kind, (link_id, source["type"])
        entry = target["inputs"][dst_slot]
        assert entry["link"] == link_id and entry["type"] == kind, (link_id, target["type"])
        if target["type"] in pack.NODE_CLASS_MAPPINGS:
            spec = pack.NODE_CLASS_MAPPINGS[target["type"]].INPUT_TYPES()
            declared = {**spec["required"], **spec.get("optional", {})}[entry["name"]][0]
            assert declared == kind, (link_id, target["type"], entry["name"])


@pytest.mark.parametrize("name", NAMES)
def test_thumbnail_is_a_jpeg_screenshot(name):
    with Image.open(os.path.join(ROOT, "example_workflows", f"{name}.jpg")) as image:
        assert image.format == "JPEG" and image.width >= 400 and image.height >= 200


def test_converter_refuses_wrong_widget_counts_and_unknown_nodes():
    workflow = load("dental_single_condition")
    apply = next(n for n in workflow["nodes"] if n["type"] == "CtrLoRAApply")
    apply["widgets_values"] = apply["widgets_values"][:-1]
    with pytest.raises(WorkflowError, match="CtrLoRAApply.*5 widget values, expected 6"):
        to_api(workflow, slots_of)
    apply["type"] = "SomeOtherPack"
    with pytest.raises(WorkflowError, match="unknown node type 'SomeOtherPack'"):
        to_api(workflow, slots_of)
