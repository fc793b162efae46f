"""UI-format workflows (what example_workflows/ holds) -> API-format prompts (what POST /prompt takes).

A UI workflow stores each node's widget values positionally (`widgets_values`) and its
connections as links. To convert, one needs each node type's widget slots in order:

- from a running server: `slots_from_object_info` (ComfyUI's /object_info);
- without ComfyUI: `CORE_NODES` (the core node types the examples may use, with their
  slots and output types; the server tests check it against /object_info) and
  `slots_from_input_types` for this pack's nodes.

A slot name starting with "+" is a value the front end stores after a widget that is
not a node input (the seed's "control after generate", Load Image's upload button).
Front-end-only nodes (notes) are skipped; muted/bypassed nodes and reroutes are refused.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
FRONTEND_ONLY = ("Note", "MarkdownNote")

# Core node types the example workflows use: widget slots (in order) and output types.
CORE_NODES: dict[str, dict[str, list[str]]] = {
    "CheckpointLoaderSimple": {"slots": ["ckpt_name"], "outputs": ["MODEL", "CLIP", "VAE"]},
    "CLIPTextEncode": {"slots": ["text"], "outputs": ["CONDITIONING"]},
    "EmptyLatentImage": {"slots": ["width", "height", "batch_size"], "outputs": ["LATENT"]},
    "KSampler": {"slots": ["seed", "+control_after_generate", "steps", "cfg", "sampler_name", "scheduler",
                           "denoise"], "outputs": ["LATENT"]},
    "VAEDecode": {"slots": [], "outputs": ["IMAGE"]},
    "SaveImage": {"slots": ["filename_prefix"], "outputs": []},
    "PreviewImage": {"slots": [], "outputs": []},
    "LoadImage": {"slots": ["image", "+upload"], "outputs": ["IMAGE", "MASK"]},
    "ControlNetLoader": {"slots": ["control_net_name"], "outputs": ["CONTROL_NET"]},
    "ControlNetApplyAdvanced": {"slots": ["strength", "start_percent", "end_percent"],
                                "outputs": ["CONDITIONING", "CONDITIONING"]},
}


class WorkflowError(ValueError):
    """A workflow that cannot be converted (unknown node, wrong widget count, bad link)."""


def _is_widget(spec: Any) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _slots(ordered_inputs: list[tuple[str, Any]]) -> list[str]:
    slots = []
    for name, spec in ordered_inputs:
        if not _is_widget(spec):
            continue
        slots.append(name)
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if options.get("control_after_generate"):
            slots.append("+control_after_generate")
        if options.get("image_upload"):
            slots.append("+upload")
    return slots


def slots_from_input_types(input_types: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Widget slots of a V1 node from its INPUT_TYPES() (required, then optional)."""
    ordered = [(name, spec) for section in ("required", "optional")
               for name, spec in input_types.get(section, {}).items()]
    return _slots(ordered)


def slots_from_object_info(info: Mapping[str, Any]) -> list[str]:
    """Widget slots of a node from its /object_info entry."""
    ordered = [(name, info["input"][section][name]) for section in ("required", "optional")
               for name in info.get("input_order", {}).get(section, [])]
    return _slots(ordered)


def to_api(workflow: Mapping[str, Any], slots_of: Callable[[str], list[str]]) -> dict[str, dict]:
    """Convert a UI-format workflow; `slots_of(node_type)` gives the widget slots (KeyError if unknown)."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        node_type, node_id = node["type"], str(node["id"])
        if node_type in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"node {node_id} ({node_type}) is muted or bypassed; not supported")
        try:
            slots = slots_of(node_type)
        except KeyError:
            raise WorkflowError(f"node {node_id}: unknown node type {node_type!r}") from None
        values = list(node.get("widgets_values") or [])
        if len(values) != len(slots):
            raise WorkflowError(f"node {node_id} ({node_type}): {len(values)} widget values, "
                                f"expected {len(slots)} ({', '.join(slots)})")
        inputs: dict[str, Any] = {}
        for slot, value in zip(slots, values):
            if not slot.startswith("+"):
                inputs[slot] = value
        for entry in node.get("inputs") or []:
            if entry.get("link") is None:
                continue
            link = links.get(entry["link"])
            if link is None or link[3] != node["id"]:
                raise WorkflowError(f"node {node_id}: input {entry['name']!r} has a broken link {entry['link']}")
            inputs[entry["name"]] = [str(link[1]), link[2]]
        prompt[node_id] = {"class_type": node_type, "inputs": inputs}
    for node_id, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] not in prompt:
                raise WorkflowError(f"node {node_id}: input {name!r} comes from missing node {value[0]}")
    return prompt
