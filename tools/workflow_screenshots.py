"""Thumbnails of example_workflows/*.json: real screenshots of each workflow loaded in the ComfyUI front end.

    COMFYUI_PATH=~/comfy-run/ComfyUI <python with playwright + Pillow> tools/workflow_screenshots.py \
        [--comfy-python ~/comfy-run/venv/bin/python] [--render-python .venv/bin/python]

Starts a throwaway headless ComfyUI (CPU, loopback) with this pack linked in and the model
names the examples use (the random test models from testbed/fake_models.py),
renders dental input maps with demo/synth_dental.py, then in headless Chromium for each
workflow: loads it, runs its condition-image preview (so the node shows the blended
condition), checks that the front end's own API conversion (app.graphToPrompt) equals
testbed/workflow_api.to_api, and saves <name>.jpg next to the workflow.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from PIL import Image
from playwright.sync_api import sync_playwright

from testbed import fake_models
from testbed.comfy_host import PACK_ROOT as ROOT
from testbed.comfy_server import ComfyServer
from testbed.workflow_api import slots_from_object_info, to_api

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 2400, "height": 1350}
THUMBNAIL_WIDTH = 1600
MODELS = {"checkpoints": [fake_models.CHECKPOINT],
          "ctrlora": [fake_models.BASE, fake_models.DENTAL_LORA, fake_models.DEPTH_LORA, fake_models.SEG_LORA]}


# Zoom and pan so the graph fills the canvas below the top bar and right of the side bar.
FIT_VIEW = """() => {
  const canvas = window.app.canvas, nodes = window.app.graph._nodes;
  const left = Math.min(...nodes.map(n => n.pos[0])), top = Math.min(...nodes.map(n => n.pos[1] - 30));
  const right = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
  const bottom = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
  const box = canvas.canvas.getBoundingClientRect(), margin = {left: 80, top: 110, right: 40, bottom: 40};
  const width = box.width - margin.left - margin.right, height = box.height - margin.top - margin.bottom;
  const scale = Math.min(width / (right - left), height / (bottom - top));
  canvas.ds.scale = scale;
  canvas.ds.offset = [margin.left / scale + (width / scale - (right - left)) / 2 - left,
                      margin.top / scale + (height / scale - (bottom - top)) / 2 - top];
  canvas.setDirty(true, true);
}"""


def render_inputs(folder: str, python: str) -> None:
    """upper_front_{lighting,seg,depth}.png from the procedural dental renderer (the maps layout)."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([python, os.path.join(ROOT, "demo", "synth_dental.py"), "--out", out, "--count", "2",
                        "--size", "256", "--extra-maps", "depth"], check=True)
        names = sorted(os.listdir(os.path.join(out, "lighting")))
        # an upper front view (sample 1): the key is <jaw>_<id>_<view>[_<detail or tag>...]
        name = next(n for n in names if n.removesuffix(".png").split("_")[0:3:2] == ["upper", "front"])
        for source, target in (("lighting", "lighting"), ("segmentation", "seg"), ("depth", "depth")):
            shutil.copy(os.path.join(out, source, name), os.path.join(folder, f"upper_front_{target}.png"))


def make_base_directory(base_dir: str, cache: str, render_python: str) -> None:
    """Models are hard links (the web panel refuses symlinks that leave the model folders)."""
    for folder, names in MODELS.items():
        os.makedirs(os.path.join(base_dir, "models", folder))
        for name in names:
            os.link(os.path.join(cache, name), os.path.join(base_dir, "models", folder, name))
    os.makedirs(os.path.join(base_dir, "custom_nodes"))
    os.symlink(ROOT, os.path.join(base_dir, "custom_nodes", "ComfyUI-CtrLoRA"))
    os.makedirs(os.path.join(base_dir, "input"))
    render_inputs(os.path.join(base_dir, "input"), render_python)


def preview_prompt(prompt: dict) -> dict:
    """Only the nodes the condition preview needs (Load Image -> Blend -> Preview Image)."""
    wanted = [k for k, v in prompt.items() if v["class_type"] == "PreviewImage"]
    keep = set()
    while wanted:
        node_id = wanted.pop()
        keep.add(node_id)
        wanted += [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list)]
    return {k: prompt[k] for k in keep}


def shoot(server: ComfyServer, workflows: list[str], chromium: str) -> None:
    object_info = server.get("/object_info")
    # no start-up template dialog; node text drawn at any zoom
    server.post("/settings", {"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 0,
                              "Comfy.Minimap.Visible": False})
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True, args=FLAGS,
                                                       viewport=VIEWPORT)
        page = context.pages[0] if context.pages else context.new_page()
        page.goto(server.url + "/", wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
        time.sleep(2)
        for _ in range(3):  # the first start shows a template dialog over the graph
            if not page.locator(".p-dialog").count():
                break
            page.keyboard.press("Escape")
            time.sleep(0.5)
        for path in workflows:
            name = os.path.splitext(os.path.basename(path))[0]
            with open(path) as f:
                workflow = json.load(f)
            page.evaluate("wf => window.app.loadGraphData(wf)", workflow)
            time.sleep(1.5)
            ours = to_api(workflow, lambda t: slots_from_object_info(object_info[t]))
            theirs = page.evaluate("async () => (await window.app.graphToPrompt()).output")
            theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in theirs.items()}
            if theirs != ours:
                raise SystemExit(f"{name}: front end and workflow_api.to_api disagree:\n"
                                 f"front end: {json.dumps(theirs, sort_keys=True)}\nours: {json.dumps(ours, sort_keys=True)}")
            client_id = page.evaluate("() => window.app.api.clientId ?? window.app.api.initialClientId")
            body = {"prompt": preview_prompt(ours), "client_id": client_id}
            status, answer = server.post("/prompt", body)
            if status != 200:
                raise SystemExit(f"{name}: preview prompt refused: {answer}")
            server.wait(answer["prompt_id"])
            time.sleep(1.5)
            page.evaluate(FIT_VIEW)
            time.sleep(1.5)
            png = os.path.join(tempfile.gettempdir(), f"{name}.png")
            page.screenshot(path=png)
            jpg = os.path.join(os.path.dirname(path), f"{name}.jpg")
            with Image.open(png) as image:
                height = round(image.height * THUMBNAIL_WIDTH / image.width)
                image.convert("RGB").resize((THUMBNAIL_WIDTH, height), Image.LANCZOS).save(
                    jpg, "JPEG", quality=85, optimize=True)
            print(f"{name}: front end conversion matches; thumbnail {jpg}")
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfy-python", default=os.path.expanduser("~/comfy-run/venv/bin/python"))
    parser.add_argument("--render-python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    cache = fake_models.cache_dir()
    if fake_models.missing_files(cache):
        subprocess.run([args.comfy_python, fake_models.__file__], check=True)
    workflows = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
    with tempfile.TemporaryDirectory(prefix="comfy-shots-", dir=os.path.dirname(cache)) as base_dir:
        make_base_directory(base_dir, cache, args.render_python)
        server = ComfyServer(comfy_path, base_dir, args.comfy_python).start()
        try:
            shoot(server, workflows, args.chromium)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
