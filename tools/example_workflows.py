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
from dataclasses import dataclass, field
from typing import Any

from ctrlora_core.prompts import DEFAULT_TEMPLATE
from testbed.comfy_host import PACK_ROOT, pack_module

pack = pack_module("nodes")
OUT_DIR = os.path.join(PACK_ROOT, "example_workflows")
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
BASE = "ctrlora_sd15_basecn700k.ckpt"
DENTAL_LORA = "ctrlora_sd15_dental_lighting_seg.safetensors"
DEPTH_LORA = "ctrlora_sd15_basecn700k_depth.ckpt"
SEG_LORA = "ctrlora_sd15_basecn700k_seg.ckpt"
NEGATIVE = "blurry, low quality, deformed, cartoon, drawing, text, watermark"

# The dental settings the user found best (issue 10): CFG in 2-4.5, the segmentation map at
# 30 % opacity over the lighting map (what the LoRA is trained on), the checkpoint's full VAE.
DENTAL_CFG = 3.5
BLEND_ALPHA = 0.3


@dataclass(frozen=True)
class Sampling:
    """KSampler settings of a workflow."""

    steps: int
    cfg: float
    sampler: str
    scheduler: str


QUALITY = Sampling(steps=20, cfg=DENTAL_CFG, sampler="ddim", scheduler="ddim_uniform")  # the official sampler
# uni_pc_bh2: ComfyUI's UniPC with the B(h) = e^h - 1 corrector, the variant meant for guided sampling
FAST = Sampling(steps=8, cfg=DENTAL_CFG, sampler="uni_pc_bh2", scheduler="simple")


def _why(sampling: Sampling) -> str:
    """The note's paragraph on the settings and the reasons for them."""
    if sampling == FAST:
        sampler = (f"- UniPC (`{FAST.sampler}`, the variant for guided sampling), {FAST.steps} steps: the user's "
                   "fast sampler; LCM over-smoothed the teeth.\n"
                   "- 512 x 512 and one condition: each further condition is one more ControlNet pass per step.\n")
    else:
        sampler = f"- DDIM, {sampling.steps} steps: the official CtrLoRA sampler; `dental_fast` is the quick variant.\n"
    return ("**Settings and why** (the user's tests on real dental data):\n"
            f"- CFG {sampling.cfg}: 2-4.5 keeps the tooth/gum boundaries sharp; 7.5 blurred them.\n"
            f"- Blend alpha {BLEND_ALPHA} (mode alpha): the segmentation at 30 % opacity over the lighting map, "
            "the blend the LoRA is trained on (`train_lora.py` uses the node's function).\n"
            "- Full VAE (the checkpoint's): TAESD lost tooth detail.\n" + sampler)

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


# Sizes the nodes are drawn at (at least what the front end computes, with the web panels).
SIZES = {
    "MarkdownNote": (340, 520), "LoadImage": (300, 340), "CtrLoRABlendLightingSeg": (320, 360),
    "PreviewImage": (300, 300), "CtrLoRALoRALoader": (340, 190), "CtrLoRACondition": (300, 100),
    "CtrLoRABlendLoRAs": (300, 240), "CheckpointLoaderSimple": (340, 100), "CtrLoRABaseLoader": (340, 170),
    "CtrLoRADentalPrompt": (400, 250), "CLIPTextEncode": (400, 170), "CtrLoRAApply": (300, 264),
    "EmptyLatentImage": (300, 110), "KSampler": (300, 270), "VAEDecode": (200, 50), "SaveImage": (300, 330),
}
GAP = 40


@dataclass
class Node:
    id: int
    type: str
    widgets: list[Any]
    title: str | None = None
    color: str | None = None
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    pos: tuple[int, int] = (0, 0)


class Graph:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.links: list[list] = []

    def add(self, node_type: str, widgets: list[Any], title: str | None = None, color: str | None = None) -> Node:
        if node_type in CORE:
            link_inputs = [(name, kind, False) for name, kind in CORE[node_type][0]]
            outputs = CORE[node_type][1]
        else:
            link_inputs, outputs = _pack_slots(node_type)
        node = Node(len(self.nodes) + 1, node_type, widgets, title, color)
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
                "id": node.id, "type": node.type, "pos": list(node.pos), "size": list(SIZES[node.type]),
                "flags": {}, "order": order, "mode": 0,
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


def column(x: int, *nodes: Node, y: int = 0) -> None:
    """Place `nodes` top to bottom at x, starting at y."""
    for node in nodes:
        node.pos = (x, y)
        y += SIZES[node.type][1] + GAP


def _sampling_tail(g: Graph, checkpoint: Node, apply: Node, x: int, sampling: Sampling) -> None:
    """Empty latent (512 x 512) -> KSampler -> decode with the checkpoint's full VAE -> save."""
    latent = g.add("EmptyLatentImage", [512, 512, 1])
    sampler = g.add("KSampler", [0, "fixed", sampling.steps, sampling.cfg, sampling.sampler, sampling.scheduler, 1.0])
    g.link(checkpoint, 0, sampler, "model")
    g.link(apply, 0, sampler, "positive")
    g.link(apply, 1, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    decode = g.add("VAEDecode", [])
    g.link(sampler, 0, decode, "samples")
    g.link(checkpoint, 2, decode, "vae")
    save = g.add("SaveImage", ["ctrlora_dental"])
    g.link(decode, 0, save, "images")
    column(x, latent, sampler)
    column(x + 340, decode, save)


def _dental_condition_image(g: Graph, note: Node, *more_inputs: Node) -> Node:
    """Lighting + segmentation maps -> blended condition image (with a preview); column 0 and 1."""
    lighting = g.add("LoadImage", ["upper_front_lighting.png", "image"], title="Lighting map")
    seg = g.add("LoadImage", ["upper_front_seg.png", "image"], title="Segmentation map")
    blend = g.add("CtrLoRABlendLightingSeg", [BLEND_ALPHA, "alpha"])
    g.link(lighting, 0, blend, "lighting")
    g.link(seg, 0, blend, "segmentation")
    # Load Image's MASK carries the map's transparency: the blend flattens transparent maps as the trainer does
    g.link(lighting, 1, blend, "lighting_mask")
    g.link(seg, 1, blend, "segmentation_mask")
    preview = g.add("PreviewImage", [], title="Condition image")
    g.link(blend, 0, preview, "images")
    column(0, note, lighting, seg)
    column(360, blend, preview, *more_inputs)
    return blend


def _condition(g: Graph, lora: Node, image: Node, weight: float, title: str | None = None) -> Node:
    """A CtrLoRA Condition node fed by `lora` and the condition `image`."""
    condition = g.add("CtrLoRACondition", [weight], title=title)
    g.link(lora, 0, condition, "lora")
    g.link(image, 0, condition, "image")
    return condition


def _note(g: Graph, text: str) -> Node:
    return g.add("MarkdownNote", [text], color=NOTE_COLOR)


def _prompts_base_apply(g: Graph, conditions: Node, sampling: Sampling = QUALITY) -> None:
    """Checkpoint, Base ControlNet, prompts -> Apply CtrLoRA -> sampling (columns 3 to 6)."""
    checkpoint = g.add("CheckpointLoaderSimple", [CHECKPOINT])
    base = g.add("CtrLoRABaseLoader", [BASE])
    prompt = g.add("CtrLoRADentalPrompt", ["upper", "front", DEFAULT_TEMPLATE, ""])
    positive = g.add("CLIPTextEncode", [""], title="Positive (from Dental Prompt)")
    g.link(checkpoint, 1, positive, "clip")
    g.link(prompt, 0, positive, "text", widget=True)
    negative = g.add("CLIPTextEncode", [NEGATIVE], title="Negative")
    g.link(checkpoint, 1, negative, "clip")
    apply = g.add("CtrLoRAApply", [1.0, 0.0, 1.0, True, "constant", True])
    g.link(positive, 0, apply, "positive")
    g.link(negative, 0, apply, "negative")
    g.link(base, 0, apply, "base")
    g.link(conditions, 0, apply, "conditions")
    g.link(checkpoint, 2, apply, "vae")
    column(1100, checkpoint, base, prompt)
    column(1540, positive, negative, apply)
    _sampling_tail(g, checkpoint, apply, 1980, sampling)


def _single_condition(title: str, sampling: Sampling) -> dict:
    """Lighting + segmentation -> one LoRA -> Apply CtrLoRA -> `sampling`; the note starts with `title`."""
    g = Graph()
    note = _note(g, f"### {title}\n"
                 f"- `models/checkpoints/{CHECKPOINT}` (SD1.5)\n"
                 f"- `models/ctrlora/{BASE}` (official Base ControlNet)\n"
                 f"- `models/ctrlora/{DENTAL_LORA}` (trained with `train/train_lora.py`)\n"
                 "- lighting and segmentation maps of the teeth model in `input/`\n\n" + _why(sampling) +
                 "\nThe prompt comes from the jaw and view (or a file name such as `upper_front_0001.png`).")
    condition_image = _dental_condition_image(g, note)
    lora = g.add("CtrLoRALoRALoader", [DENTAL_LORA, 1.0])
    condition = _condition(g, lora, condition_image, 1.0)
    column(720, lora, condition)
    _prompts_base_apply(g, condition, sampling)
    return g.to_json()


def dental_single_condition() -> dict:
    return _single_condition("CtrLoRA: dental render from one condition", QUALITY)


def dental_fast() -> dict:
    return _single_condition("CtrLoRA: fast dental render (sub-second goal)", FAST)


def dental_multi_condition() -> dict:
    g = Graph()
    note = _note(g, "### CtrLoRA: two conditions on one Base ControlNet\n"
                 f"1. lighting + segmentation with `{DENTAL_LORA}`\n"
                 f"2. a depth render of the same teeth model with the official `{DEPTH_LORA}`, weight 0.5\n\n"
                 "Chain any number of **CtrLoRA Condition** nodes: they run as one batch through one copy "
                 "of the base; their residuals are summed with the condition weights.\n\n"
                 "Lighting and segmentation stay blended into ONE condition: two weighted LoRAs, one per map, "
                 "gave ghosting and concept bleed in the user's tests. Add a second condition for what the "
                 "first lacks (here depth), at a lower weight.\n\n" + _why(QUALITY))
    depth_image = g.add("LoadImage", ["upper_front_depth.png", "image"], title="Depth map")
    condition_image = _dental_condition_image(g, note, depth_image)
    dental_lora = g.add("CtrLoRALoRALoader", [DENTAL_LORA, 1.0])
    first = _condition(g, dental_lora, condition_image, 1.0, title="Condition 1: lighting + seg")
    depth_lora = g.add("CtrLoRALoRALoader", [DEPTH_LORA, 1.0])
    second = _condition(g, depth_lora, depth_image, 0.5, title="Condition 2: depth")
    g.link(first, 0, second, "previous")
    column(720, dental_lora, first, depth_lora, second)
    _prompts_base_apply(g, second)
    return g.to_json()


def lora_blending() -> dict:
    g = Graph()
    note = _note(g, "### CtrLoRA: blend two LoRAs into one condition\n"
                 f"`{DENTAL_LORA}` x 0.7 + the official `{SEG_LORA}` x 0.3, used for the lighting + "
                 "segmentation condition. rank 0 keeps the blend exact; a save_name writes it to "
                 "`models/ctrlora/` to load later like any LoRA.\n\n"
                 "Mind the user's finding: weighting a lighting LoRA against a segmentation LoRA gave ghosting "
                 "and concept bleed; one LoRA trained on the blended maps (`dental_single_condition`) did "
                 "better. On ghosting, lower the second weight.\n\n"
                 + _why(QUALITY))
    condition_image = _dental_condition_image(g, note)
    dental_lora = g.add("CtrLoRALoRALoader", [DENTAL_LORA, 1.0])
    seg_lora = g.add("CtrLoRALoRALoader", [SEG_LORA, 1.0])
    blend = g.add("CtrLoRABlendLoRAs", [0.7, 0.3, 0.5, 0.5, 0, ""])
    g.link(dental_lora, 0, blend, "lora_1")
    g.link(seg_lora, 0, blend, "lora_2")
    condition = _condition(g, blend, condition_image, 1.0)
    column(720, dental_lora, seg_lora, blend, condition)
    _prompts_base_apply(g, condition)
    return g.to_json()


WORKFLOWS = {
    "dental_single_condition": dental_single_condition,
    "dental_fast": dental_fast,
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
