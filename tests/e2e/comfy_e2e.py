"""Harness for the browser end-to-end tests: a real ComfyUI server on loopback with this pack
linked into its custom_nodes, and headless Debian Chromium driven by Playwright.

Environment:
  COMFYUI_PATH    ComfyUI checkout (v0.3.64) - required, else the tests skip.
  COMFYUI_PYTHON  Python that runs ComfyUI (its venv); default: the Python running pytest.
  CHROMIUM        Chromium executable; default /usr/bin/chromium (Debian package).
The Python running pytest needs the `playwright` package (pip install playwright; do NOT run
`playwright install`: the system Chromium is used). Screenshots go to tests/artifacts/e2e/.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from testbed.comfy_server import ComfyServer

PACK_DIR = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI-CtrLoRA"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "e2e"
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
SERVER_START_TIMEOUT = 240
IMAGE_SIZE = (64, 48)  # width, height of the test condition images
LORA_METADATA = {"condition": "dental", "prompt_template": "a 3D dental model of {jaw} teeth, {view} view",
                 "training_steps": 1500, "resolution": 512, "maps": "lighting,segmentation", "blend_mode": "alpha",
                 "blend_alpha": 0.3, "region_weights": "teeth=5,gum=1",
                 "seg_palette": "teeth=#C4C474,gum=#CC442C,background=#383838"}


def e2e_skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not COMFYUI_PATH:
        return "COMFYUI_PATH is not set (path of a ComfyUI v0.3.64 checkout; see the README section 'In the browser')"
    if not (Path(COMFYUI_PATH) / "main.py").is_file():
        return f"COMFYUI_PATH={COMFYUI_PATH} has no main.py"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    if importlib.util.find_spec("playwright") is None:
        return ("python package `playwright` is not importable (pip install playwright; no `playwright "
                "install` needed: the tests drive the system Chromium)")
    return None


def _write_images(folder: Path) -> dict[str, Path]:
    """A lighting map (smooth shading) and a segmentation map (flat colour regions)."""
    width, height = IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width]
    shade = 255 * np.exp(-((x - 40) ** 2 + (y - 20) ** 2) / 900.0)
    lighting = np.stack([shade, shade * 0.9 + x, (x * 4 + y) % 256], axis=-1)
    palette = np.array([[230, 40, 40], [40, 200, 90], [50, 80, 220], [240, 240, 240]])
    seg = palette[(x // 16 + (y >= 24) * 2) % 4]
    paths = {"lighting": folder / "ctrlora_lighting.png", "seg": folder / "ctrlora_seg.png"}
    Image.fromarray(np.clip(lighting, 0, 255).astype(np.uint8)).save(paths["lighting"])
    Image.fromarray(seg.astype(np.uint8)).save(paths["seg"])
    return paths


def _write_models(folder: Path, outside: Path) -> None:
    """Small random CtrLoRA files (a base, a LoRA with metadata), a pickle .ckpt, a symlink out."""
    from ctrlora_core.formats import save_adapter
    from ctrlora_core.random_weights import SMALL_CONFIG, random_adapter, random_base, save_random_base

    base = random_base(SMALL_CONFIG, seed=0)
    save_random_base(folder / "ctrlora_base_small.safetensors", base)
    save_adapter(random_adapter(base, 4, seed=1, name="dental"), folder / "dental_lora.safetensors", LORA_METADATA)
    (folder / "official_lora.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))
    save_adapter(random_adapter(base, 4, seed=2), outside / "secret.safetensors")
    os.symlink(outside / "secret.safetensors", folder / "escape.safetensors")


@contextmanager
def running_comfy(root: Path):
    """Start ComfyUI with a fresh base directory under `root`; yield its URL and files; stop it."""
    base = root / "base"
    for sub in ("custom_nodes", "models/ctrlora", "models/controlnet", "input", "output", "user/default"):
        (base / sub).mkdir(parents=True)
    (root / "outside").mkdir()
    os.symlink(PACK_DIR, base / "custom_nodes" / PACK_NAME)
    _write_models(base / "models" / "ctrlora", root / "outside")
    images = _write_images(base / "input")
    # No first-run template browser and no minimap over the graph.
    settings = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(settings))

    server = ComfyServer(COMFYUI_PATH, str(base), COMFYUI_PYTHON)
    try:
        server.start(timeout=SERVER_START_TIMEOUT)
        log_lines = server.log_tail(1_000_000).splitlines()
        if any("IMPORT FAILED" in line and PACK_NAME in line for line in log_lines):
            raise RuntimeError(f"the pack failed to import:\n{server.log_tail()}")
        yield SimpleNamespace(url=server.url, base=base, images=images)
    finally:
        server.stop()


@contextmanager
def browser_on(url: str):
    """A Chromium page on the ComfyUI front end with the graph and this extension ready.

    Yields SimpleNamespace(page, console_errors).
    """
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="ctrlora-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 1000})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
            page.wait_for_function(
                "() => window.app.extensions.some((e) => e.name === 'ComfyUI-CtrLoRA.panels')", timeout=60_000)
            yield SimpleNamespace(page=page, console_errors=errors)
        finally:
            context.close()
