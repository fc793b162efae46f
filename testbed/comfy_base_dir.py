"""A throwaway ComfyUI --base-directory for the server tests and the soak bench.

`make_base_directory(base_dir, cache)` fills it: the pack linked into custom_nodes/, the
cached random-weight models (testbed/fake_models.py) linked into models/ under the names
the example workflows use, and generated condition images in input/.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from . import fake_models
from .comfy_host import PACK_ROOT

PACK_FOLDER = "ComfyUI-CtrLoRA"  # the pack's folder name in custom_nodes/
INPUT_SIZE = (96, 80)  # width, height: not the latent's aspect, so hints are cropped and resized


def write_input_images(folder: str) -> dict[str, str]:
    """Lighting, segmentation and depth maps of a made-up teeth arch (simple shapes), as PNGs."""
    width, height = INPUT_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = width / 2, height * 0.9
    radius = np.hypot((x - cx) / (width * 0.45), (y - cy) / (height * 0.8))
    arch = (radius > 0.55) & (radius < 1.0)
    shade = np.clip(1.2 - radius, 0, 1) * arch
    # the user's flat segmentation colours: teeth, gums (the outer rim and between teeth), dark grey background
    palette = np.array([[196, 196, 116], [204, 68, 44], [56, 56, 56]], dtype=np.uint8)
    between_teeth = (np.arctan2(y - cy, x - cx) * 2.5) % 1 < 0.1
    region = np.where(arch, np.where((radius > 0.85) | between_teeth, 1, 0), 2)
    images = {
        "upper_front_lighting.png": np.repeat((shade * 255).astype(np.uint8)[..., None], 3, axis=2),
        "upper_front_seg.png": palette[region],
        "upper_front_depth.png": np.repeat((np.clip(1 - radius, 0, 1) * arch * 255).astype(np.uint8)[..., None],
                                           3, axis=2),
    }
    paths = {}
    for name, pixels in images.items():
        paths[name] = os.path.join(folder, name)
        Image.fromarray(pixels).save(paths[name])
    return paths


def make_base_directory(base_dir: str, cache: str) -> None:
    """models/, custom_nodes/ and input/ of a throwaway ComfyUI base directory."""
    layout = {
        "checkpoints": [fake_models.CHECKPOINT],
        "controlnet": [fake_models.CONTROLNET, fake_models.DEPTH_LORA],  # a CtrLoRA LoRA where ACN users keep it
        "ctrlora": [fake_models.BASE, fake_models.DENTAL_LORA, fake_models.SEG_LORA, fake_models.MISMATCHED_LORA],
    }
    for folder, names in layout.items():
        os.makedirs(os.path.join(base_dir, "models", folder), exist_ok=True)
        for name in names:
            os.symlink(os.path.join(cache, name), os.path.join(base_dir, "models", folder, name))
    os.makedirs(os.path.join(base_dir, "custom_nodes"))
    os.symlink(PACK_ROOT, os.path.join(base_dir, "custom_nodes", PACK_FOLDER))
    os.makedirs(os.path.join(base_dir, "input"))
    write_input_images(os.path.join(base_dir, "input"))
