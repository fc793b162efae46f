"""Fixtures for the tests that need a ComfyUI checkout ($COMFYUI_PATH); without it they are skipped.

Run them in an environment with ComfyUI's packages and this checkout installed (see the Makefile):

    make comfy-test COMFYUI_PATH=/path/to/ComfyUI COMFY_VENV=/path/to/comfy-venv

- `comfy_lib`: ComfyUI importable in this process, forced to the CPU (library tests).
- `model_cache`: random-weight full-size model files (testbed/fake_models.py), built once and cached.
- `comfy_server`: one headless ComfyUI (CPU, loopback, free port) for the session, with a
  temporary --base-directory: the pack linked into custom_nodes/, the cached models linked
  into models/ under the names the example workflows use, generated images in input/.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from testbed import fake_models
from testbed.comfy_host import PACK_ROOT, import_comfy
from testbed.comfy_server import ComfyServer

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
SKIP_REASON = "COMFYUI_PATH is not set: ComfyUI integration tests skipped (see tests/integration/conftest.py)"
PACK_NAME = "ComfyUI-CtrLoRA"  # the pack's folder name in custom_nodes/
INPUT_SIZE = (96, 80)  # width, height: not the latent's aspect, so hints are cropped and resized


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_lib():
    """Import ComfyUI as a library on the CPU."""
    try:
        comfy = import_comfy(COMFYUI_PATH)
        import comfy.controlnet  # noqa: F401  (pulls in sd, ...)
        import comfy.sd  # noqa: F401
    except FileNotFoundError as err:
        pytest.fail(f"COMFYUI_PATH: {err}")
    except ImportError as err:
        pytest.skip(f"comfy does not import with this Python ({err}); run `make comfy-test`")
    return comfy


@pytest.fixture(scope="session")
def model_cache() -> str:
    folder = fake_models.cache_dir()
    if fake_models.missing_files(folder):
        # in a process of its own: building the checkpoint peaks at ~10 GiB, given back when it exits
        subprocess.run([sys.executable, "-m", "testbed.fake_models"], check=True,
                       env=dict(os.environ, COMFYUI_PATH=COMFYUI_PATH), timeout=1800)
    assert not fake_models.missing_files(folder)
    return folder


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
    os.symlink(PACK_ROOT, os.path.join(base_dir, "custom_nodes", PACK_NAME))
    os.makedirs(os.path.join(base_dir, "input"))
    write_input_images(os.path.join(base_dir, "input"))


@pytest.fixture(scope="session")
def comfy_server(model_cache, tmp_path_factory):
    base_dir = str(tmp_path_factory.mktemp("comfyui_base"))
    make_base_directory(base_dir, model_cache)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    server = ComfyServer(COMFYUI_PATH, base_dir, python).start()
    try:
        yield server
    finally:
        server.stop()
