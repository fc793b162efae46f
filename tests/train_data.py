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
