"""Small synthetic datasets for the trainer tests (images drawn with numpy, dental file names)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

NAMES = ("upper_front", "lower_left", "upper_top", "lower_right", "upper_bottom", "lower_front")


def pair_images(index: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A condition (a disc on black) and a target (the same disc, shaded, on grey), uint8 HWC."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size] / size
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    inside = (x - cx) ** 2 + (y - cy) ** 2 < r**2
    colour = rng.uniform(0.3, 1.0, 3)
    cond = inside[..., None] * colour
    target = np.where(inside[..., None], colour * (0.5 + 0.5 * (1 - y[..., None])), 0.5)
    return (cond * 255).astype(np.uint8), (target * 255).astype(np.uint8)


def write_dental(root: Path, count: int = 8, size: int = 64) -> Path:
    """root/source and root/target with names like upper_front_0003.png."""
    (root / "source").mkdir(parents=True, exist_ok=True)
    (root / "target").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cond, target = pair_images(i, size)
        name = f"{NAMES[i % len(NAMES)]}_{i:04d}.png"
        Image.fromarray(cond).save(root / "source" / name)
        Image.fromarray(target).save(root / "target" / name)
    return root


def write_official(root: Path, count: int = 4, size: int = 64, as_array: bool = False) -> Path:
    """root/prompt.json (JSON Lines, or one JSON array) + source/ + target/."""
    (root / "source").mkdir(parents=True, exist_ok=True)
    (root / "target").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        cond, target = pair_images(100 + i, size)
        Image.fromarray(cond).save(root / "source" / f"{i}.png")
        Image.fromarray(target).save(root / "target" / f"{i}.png")
        entries.append({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"a disc number {i}"})
    text = json.dumps(entries) if as_array else "\n".join(json.dumps(e) for e in entries) + "\n"
    (root / "prompt.json").write_text(text)
    return root


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: on a shared 2-core machine two threads stall each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Real-shaped keys of the first user's renders: ids between jaw and view, compound views, tags.
MAP_KEYS = ("upper_AB12CD34_left", "lower_patient7_bottom", "upper_smith_front_top_left",
            "lower_XY12ZW34_front_slightly_up", "upper_AB12CD34_front_weight_5", "lower_patient7_right_1")
TEETH, GUM, BACKGROUND = (196, 196, 116), (204, 68, 44), (56, 56, 56)


def map_images(index: int, size: int = 64) -> dict[str, np.ndarray]:
    """Lighting (grey shading), segmentation (teeth / gum / background palette colours) and target,
    uint8 HWC, plus `foreground` (bool HW): a disc of teeth above a band of gum."""
    rng = np.random.default_rng(1000 + index)
    y, x = np.mgrid[0:size, 0:size] / size
    cx, cy, r = rng.uniform(0.35, 0.65), rng.uniform(0.3, 0.45), rng.uniform(0.15, 0.25)
    teeth = (x - cx) ** 2 + (y - cy) ** 2 < r**2
    gum = (y > cy + 0.1) & (y < 0.85) & ~teeth
    foreground = teeth | gum
    seg = np.select([teeth[..., None], gum[..., None]], [np.array(TEETH), np.array(GUM)], np.array(BACKGROUND))
    shade = (0.3 + 0.7 * (1 - y)) * foreground
    lighting = np.repeat(shade[..., None], 3, axis=2)
    colour = np.where(teeth[..., None], [0.92, 0.9, 0.8], [0.8, 0.35, 0.35])
    target = np.where(foreground[..., None], colour * (0.4 + 0.6 * shade[..., None]), 0.5)
    return {"lighting": (lighting * 255).round().astype(np.uint8), "segmentation": seg.astype(np.uint8),
            "target": (target * 255).round().astype(np.uint8), "foreground": foreground}


def write_maps(root: Path, count: int = 6, size: int = 64, flat: bool = False, seg_name: str = "segmentation",
               rgba: bool = False) -> Path:
    """The maps layout: root/lighting/<key>.png, root/<seg_name>/<key>.png, root/target/<key>.png,
    or (flat) root/lighting_<key>.png, root/<seg_name>_<key>.png, root/<key>.png.

    rgba: the maps are RGBA renders with a transparent background (RGB 0 there, as many renderers write).
    """
    folders = {"lighting": "lighting", "segmentation": seg_name, "target": "target"}
    for folder in folders.values():
        (root if flat else root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        key = MAP_KEYS[i % len(MAP_KEYS)] + (f"_{i}" if i >= len(MAP_KEYS) else "")
        images = map_images(i, size)
        for kind, folder in folders.items():
            pixels = images[kind]
            if rgba and kind != "target":
                alpha = np.where(images["foreground"], 255, 0).astype(np.uint8)
                pixels = np.concatenate([pixels * images["foreground"][..., None], alpha[..., None]], axis=2)
            name = f"{key}.png" if not flat or kind == "target" else f"{folder}_{key}.png"
            Image.fromarray(pixels).save((root if flat else root / folder) / name)
    return root
