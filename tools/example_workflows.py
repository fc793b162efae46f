"""Source of the example workflows in example_workflows/ (UI format, only core + this pack's nodes).

    .venv/bin/python tools/example_workflows.py            # writes example_workflows/*.json

Each workflow is written as a small graph description below; inputs and outputs of the
pack's nodes come from their INPUT_TYPES/RETURN_TYPES, those of the few core nodes
from CORE. tools/workflow_screenshots.py then loads every file in the ComfyUI front
end, stores the front end's own serialization back (sizes, ordering) and takes the
.jpg thumbnails.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import nodes as pack  # noqa: E402
from ctrlora_core.prompts import DEFAULT_TEMPLATE  # noqa: E402

OUT_DIR = os.path.join(ROOT, "example_workflows")
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
BASE = "ctrlora_sd15_basecn700k.ckpt"
DENTAL_LORA = "ctrlora_sd15_dental_lighting_seg.safetensors"
DEPTH_LORA = "ctrlora_sd15_basecn700k_depth.ckpt"
SEG_LORA = "ctrlora_sd15_basecn700k_seg.ckpt"
NEGATIVE = "blurry, low quality, deformed, cartoon, drawing, text, watermark"

# Core nodes used: (link inputs, outputs) as (name, type) pairs, in ComfyUI's order.
CORE: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "PreviewImage": ([("images", "IMAGE")], []),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "MarkdownNote": ([], []),
}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def _pack_slots(node_type: str) -> tuple[list[tuple[str, str, bool]], list[tuple[str, str]]]:
    cls = pack.NODE_CLASS_MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    inputs = [(name, s[0], section == "optional") for section in ("required", "optional")
              for name, s in spec.get(section, {}).items()
              if not isinstance(s[0], list) and s[0] not in WIDGET_TYPES]
    names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
    return inputs, list(zip(names, cls.RETURN_TYPES))


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: list[Any]
    title: str | None = None
    color: str | None = None
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)


class Graph:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.links: list[list] = []

    def add(self, node_type: str, pos: tuple[int, int], widgets: list[Any], title: str | None = None,
            color: str | None = None) -> Node:
        if node_type in CORE:
            link_inputs = [(name, kind, False) for name, kind in CORE[node_type][0]]
            outputs = CORE[node_type][1]
        else:
            link_inputs, outputs = _pack_slots(node_type)
        node = Node(len(self.nodes) + 1, node_type, pos, widgets, title, color)
        for name, kind, optional in link_inputs:
            entry = {"name": name, "type": kind, "link": None}
            if optional:
                entry["shape"] = 7  # the front end's mark for optional inputs
            node.inputs.append(entry)
        node.outputs = [{"name": name, "type": kind, "links": [], "slot_index": i}
                        for i, (name, kind) in enumerate(outputs)]
        self.nodes.append(node)
        return node

    def link(self, src: Node, src_slot: int, dst: Node, input_name: str, widget: bool = False) -> None:
        """Connect output `src_slot` of `src` to input `input_name` of `dst` (a widget input if `widget`)."""
        kind = src.outputs[src_slot]["type"]
        link_id = len(self.links) + 1
        names = [entry["name"] for entry in dst.inputs]
        if widget:
            dst.inputs.append({"name": input_name, "type": kind, "widget": {"name": input_name}, "link": link_id})
            slot = len(dst.inputs) - 1
        else:
            slot = names.index(input_name)
            dst.inputs[slot]["link"] = link_id
        src.outputs[src_slot]["links"].append(link_id)
        self.links.append([link_id, src.id, src_slot, dst.id, slot, kind])

    def to_json(self) -> dict:
        nodes = []
        for order, node in enumerate(self.nodes):
            entry: dict[str, Any] = {
                "id": node.id, "type": node.type, "pos": list(node.pos), "flags": {}, "order": order, "mode": 0,
                "inputs": node.inputs,
                "outputs": [dict(o, links=o["links"] or None) for o in node.outputs],
                "properties": {"Node name for S&R": node.type},
                "widgets_values": node.widgets,
            }
            if node.title:
                entry["title"] = node.title
            if node.color:
                entry["color"], entry["bgcolor"] = node.color
            nodes.append(entry)
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}},
                "version": 0.4}


NOTE_COLOR = ("#432", "#653")


def _sampling_tail(g: Graph, checkpoint: Node, apply: Node, x: int) -> None:
    """Empty latent -> KSampler (official defaults: DDIM, 20 steps, CFG 7.5) -> decode -> save."""
    latent = g.add("EmptyLatentImage", (x, 420), [512, 512, 1])
    sampler = g.add("KSampler", (x + 340, 0), [0, "fixed", 20, 7.5, "ddim", "ddim_uniform", 1.0])
    g.link(checkpoint, 0, sampler, "model")
    g.link(apply, 0, sampler, "positive")
    g.link(apply, 1, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    decode = g.add("VAEDecode", (x + 700, 0), [])
    g.link(sampler, 0, decode, "samples")
    g.link(checkpoint, 2, decode, "vae")
    save = g.add("SaveImage", (x + 700, 120), ["ctrlora_dental"])
    g.link(decode, 0, save, "images")


def _dental_condition_image(g: Graph) -> Node:
    """Lighting + segmentation maps -> blended condition image (with a preview)."""
    lighting = g.add("LoadImage", (0, 0), ["upper_front_lighting.png", "image"], title="Lighting map")
    seg = g.add("LoadImage", (0, 420), ["upper_front_seg.png", "image"], title="Segmentation map")
    blend = g.add("CtrLoRABlendLightingSeg", (360, 0), [0.5, "alpha"])
    g.link(lighting, 0, blend, "lighting")
    g.link(seg, 0, blend, "segmentation")
    preview = g.add("PreviewImage", (360, 200), [], title="Condition image")
    g.link(blend, 0, preview, "images")
    return blend


def _prompts_and_base(g: Graph, x: int) -> tuple[Node, Node, Node, Node]:
    """Checkpoint, Base ControlNet, Dental Prompt -> CLIP Text Encode (positive), negative prompt."""
    checkpoint = g.add("CheckpointLoaderSimple", (x, 0), [CHECKPOINT])
    base = g.add("CtrLoRABaseLoader", (x, 150), [BASE])
    prompt = g.add("CtrLoRADentalPrompt", (x, 280), ["upper", "front", DEFAULT_TEMPLATE, ""])
    positive = g.add("CLIPTextEncode", (x + 400, 280), [""], title="Positive (from Dental Prompt)")
    g.link(checkpoint, 1, positive, "clip")
    g.link(prompt, 0, positive, "text", widget=True)
    negative = g.add("CLIPTextEncode", (x + 400, 470), [NEGATIVE], title="Negative")
    g.link(checkpoint, 1, negative, "clip")
    return checkpoint, base, positive, negative


def _apply(g: Graph, x: int, checkpoint: Node, base: Node, positive: Node, negative: Node,
           conditions: Node) -> Node:
    apply = g.add("CtrLoRAApply", (x, 0), [1.0, 0.0, 1.0, True, "constant"])
    g.link(positive, 0, apply, "positive")
    g.link(negative, 0, apply, "negative")
    g.link(base, 0, apply, "base")
    g.link(conditions, 0, apply, "conditions")
    g.link(checkpoint, 2, apply, "vae")
    return apply


def dental_single_condition() -> dict:
    g = Graph()
    g.add("MarkdownNote", (0, -260), [
        "### CtrLoRA: dental render from one condition\n"
        f"- `models/checkpoints/{CHECKPOINT}` (SD1.5)\n"
        f"- `models/ctrlora/{BASE}` (official Base ControlNet)\n"
        f"- `models/ctrlora/{DENTAL_LORA}` (a LoRA trained with `train/train_lora.py`)\n"
        "- lighting and segmentation maps of the teeth model in `input/`\n\n"
        "The prompt comes from the jaw and view (or a file name such as `upper_front_0001.png`)."],
        color=NOTE_COLOR)
    condition_image = _dental_condition_image(g)
    lora = g.add("CtrLoRALoRALoader", (760, 0), [DENTAL_LORA, 1.0])
    condition = g.add("CtrLoRACondition", (760, 150), [1.0])
    g.link(lora, 0, condition, "lora")
    g.link(condition_image, 0, condition, "image")
    checkpoint, base, positive, negative = _prompts_and_base(g, 1120)
    apply = _apply(g, 1900, checkpoint, base, positive, negative, condition)
    _sampling_tail(g, checkpoint, apply, 2260)
    return g.to_json()


def dental_multi_condition() -> dict:
    g = Graph()
    g.add("MarkdownNote", (0, -260), [
        "### CtrLoRA: two conditions on one Base ControlNet\n"
        f"Condition 1: lighting + segmentation with `{DENTAL_LORA}`.\n"
        f"Condition 2: a depth render of the same teeth model with the official `{DEPTH_LORA}`.\n\n"
        "Chain any number of **CtrLoRA Condition** nodes: they run as one batch through one copy "
        "of the base, and their residuals are summed with the condition weights."], color=NOTE_COLOR)
    condition_image = _dental_condition_image(g)
    depth_image = g.add("LoadImage", (0, 840), ["upper_front_depth.png", "image"], title="Depth map")
    dental_lora = g.add("CtrLoRALoRALoader", (760, 0), [DENTAL_LORA, 1.0])
    first = g.add("CtrLoRACondition", (760, 150), [1.0], title="Condition 1: lighting + seg")
    g.link(dental_lora, 0, first, "lora")
    g.link(condition_image, 0, first, "image")
    depth_lora = g.add("CtrLoRALoRALoader", (760, 420), [DEPTH_LORA, 1.0])
    second = g.add("CtrLoRACondition", (760, 570), [0.5], title="Condition 2: depth")
    g.link(depth_lora, 0, second, "lora")
    g.link(depth_image, 0, second, "image")
    g.link(first, 0, second, "previous")
    checkpoint, base, positive, negative = _prompts_and_base(g, 1120)
    apply = _apply(g, 1900, checkpoint, base, positive, negative, second)
    _sampling_tail(g, checkpoint, apply, 2260)
    return g.to_json()


def lora_blending() -> dict:
    g = Graph()
    g.add("MarkdownNote", (0, -260), [
        "### CtrLoRA: blend two LoRAs into one condition\n"
        f"`{DENTAL_LORA}` x 0.7 + the official `{SEG_LORA}` x 0.3, used for the lighting + "
        "segmentation condition. rank 0 keeps the blend exact; set save_name to write it to "
        "`models/ctrlora/` and load it later like any LoRA."], color=NOTE_COLOR)
    condition_image = _dental_condition_image(g)
    dental_lora = g.add("CtrLoRALoRALoader", (760, 0), [DENTAL_LORA, 1.0])
    seg_lora = g.add("CtrLoRALoRALoader", (760, 150), [SEG_LORA, 1.0])
    blend = g.add("CtrLoRABlendLoRAs", (760, 300), [0.7, 0.3, 0.5, 0.5, 0, ""])
    g.link(dental_lora, 0, blend, "lora_1")
    g.link(seg_lora, 0, blend, "lora_2")
    condition = g.add("CtrLoRACondition", (760, 560), [1.0])
    g.link(blend, 0, condition, "lora")
    g.link(condition_image, 0, condition, "image")
    checkpoint, base, positive, negative = _prompts_and_base(g, 1120)
    apply = _apply(g, 1900, checkpoint, base, positive, negative, condition)
    _sampling_tail(g, checkpoint, apply, 2260)
    return g.to_json()


WORKFLOWS = {
    "dental_single_condition": dental_single_condition,
    "dental_multi_condition": dental_multi_condition,
    "lora_blending": lora_blending,
}


def main() -> None:
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, build in WORKFLOWS.items():
        path = os.path.join(OUT_DIR, f"{name}.json")
        with open(path, "w") as f:
            json.dump(build(), f, indent=1)
        print(path)


if __name__ == "__main__":
    main()
