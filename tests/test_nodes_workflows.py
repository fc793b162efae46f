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


def test_the_four_examples_exist():
    assert NAMES == ["dental_fast", "dental_multi_condition", "dental_single_condition", "lora_blending"]


def nodes_of(workflow: dict, node_type: str) -> list[dict]:
    return [node for node in workflow["nodes"] if node["type"] == node_type]


def widgets(workflow: dict, node_type: str) -> dict:
    """The widget values of the one `node_type` node, by input name."""
    (node,) = nodes_of(workflow, node_type)
    return dict(zip(slots_of(node_type), node["widgets_values"], strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_dental_settings_are_the_users_and_the_note_says_why(name):
    """CFG in 2-4.5, the maps blended at 0.3 (alpha), decoded by the checkpoint's full VAE."""
    workflow = load(name)
    sampler = widgets(workflow, "KSampler")
    assert 2.0 <= sampler["cfg"] <= 4.5
    assert widgets(workflow, "CtrLoRABlendLightingSeg") == {"alpha": 0.3, "mode": "alpha"}
    nodes_by_id = {node["id"]: node for node in workflow["nodes"]}
    vae_sources = {nodes_by_id[src]["type"] for _, src, _, _, _, kind in workflow["links"] if kind == "VAE"}
    assert vae_sources == {"CheckpointLoaderSimple"}  # no TAESD (VAELoader) anywhere
    (note,) = nodes_of(workflow, "MarkdownNote")
    text = note["widgets_values"][0]
    assert f"CFG {sampler['cfg']}" in text and "7.5 blurred" in text
    assert "alpha 0.3" in text and "TAESD lost tooth detail" in text
    assert f"{sampler['steps']} steps" in text


def test_dental_fast_is_few_unipc_steps_at_512_with_one_condition():
    workflow = load("dental_fast")
    sampler = widgets(workflow, "KSampler")
    assert sampler["sampler_name"] in ("uni_pc", "uni_pc_bh2") and 6 <= sampler["steps"] <= 8
    assert widgets(workflow, "EmptyLatentImage") == {"width": 512, "height": 512, "batch_size": 1}
    assert len(nodes_of(workflow, "CtrLoRACondition")) == 1 and len(nodes_of(workflow, "CtrLoRALoRALoader")) == 1
    assert "LCM over-smoothed" in nodes_of(workflow, "MarkdownNote")[0]["widgets_values"][0]


@pytest.mark.parametrize("name", ["dental_multi_condition", "lora_blending"])
def test_notes_of_two_lora_workflows_warn_of_ghosting(name):
    assert "ghosting" in nodes_of(load(name), "MarkdownNote")[0]["widgets_values"][0]


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
