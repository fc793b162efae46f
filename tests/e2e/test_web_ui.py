"""End-to-end: the front-end extension in headless Chromium against a real ComfyUI server.

Loads the dental example workflow, picks files in the loaders and checks the metadata panels,
changes alpha/mode and checks the live blend preview pixel for pixel against
ctrlora_core.conditions, checks the live dental prompt, and the info route's refusals over HTTP.
No prompt is queued (no SD1.5 weights needed). Screenshots: tests/artifacts/e2e/.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_e2e import ARTIFACTS, LORA_METADATA, PACK_DIR, browser_on, e2e_skip_reason, running_comfy
from ctrlora_core.conditions import blend_lighting_seg
from ctrlora_core.prompts import DEFAULT_TEMPLATE, PromptTemplate

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=f"browser E2E: {e2e_skip_reason()}")

PANEL_TIMEOUT_MS = 20_000

# --- small JS snippets run in the page (node ids and widget names are the published contract)
JS_NODE_IDS = "(type) => app.graph.nodes.filter((n) => n.comfyClass === type).map((n) => n.id)"
JS_SET_WIDGET = """([id, name, value]) => {
  const node = app.graph.getNodeById(id);
  const widget = node.widgets.find((w) => w.name === name);
  widget.value = value;
  widget.callback?.(widget.value, app.canvas, node);
  app.graph.setDirtyCanvas(true, true);
}"""
JS_PANEL = """([id, name]) => {
  const widget = app.graph.getNodeById(id).widgets.find((w) => w.name === name);
  return widget ? { text: widget.element.textContent, state: widget.element.dataset.state } : null;
}"""
JS_PREVIEW_STATE = """(id) => {
  const canvas = app.graph.getNodeById(id).widgets.find((w) => w.name === "ctrlora_preview").element
    .querySelector("canvas");
  return { state: canvas.dataset.state, alpha: canvas.dataset.alpha, mode: canvas.dataset.mode, title: canvas.title };
}"""
JS_PREVIEW_PIXELS = """(id) => {
  const canvas = app.graph.getNodeById(id).widgets.find((w) => w.name === "ctrlora_preview").element
    .querySelector("canvas");
  const box = canvas.getBoundingClientRect();
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  return { width: canvas.width, height: canvas.height, alpha: Number(canvas.dataset.alpha),
           mode: canvas.dataset.mode, shown: box.width > 0 && box.height > 0, data: Array.from(data) };
}"""
JS_UPSTREAM_IDS = """(id) => {
  const node = app.graph.getNodeById(id);
  return ["lighting", "segmentation"].map((name) => {
    const origin = node.getInputNode(node.inputs.findIndex((input) => input.name === name));
    return origin && origin.comfyClass === "LoadImage" ? origin.id : null;
  });
}"""
JS_WIDGET_ARROW = """([id, name]) => {
  const node = app.graph.getNodeById(id);
  const widget = node.widgets.find((w) => w.name === name);
  const y = node.pos[1] + (widget.y ?? widget.last_y) + LiteGraph.NODE_WIDGET_HEIGHT / 2;
  const [x, yy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] - 22, y]);
  const box = app.canvas.canvas.getBoundingClientRect();
  return [box.left + x / (app.canvas.canvas.width / box.width), box.top + yy / (app.canvas.canvas.height / box.height)];
}"""
SAMPLE_POINTS = [(0, 0), (20, 10), (40, 20), (17, 30), (50, 40), (63, 47)]  # (x, y)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """One ComfyUI server for the module (the machine is small): stopped at teardown."""
    with running_comfy(tmp_path_factory.mktemp("comfy")) as server:
        yield server


@pytest.fixture(scope="module")
def ui(comfy):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with browser_on(comfy.url) as browser:
        yield browser


EXAMPLE_WORKFLOW = PACK_DIR / "example_workflows" / "dental_single_condition.json"


PANEL_NODES = ("CtrLoRALoRALoader", "CtrLoRABaseLoader", "CtrLoRABlendLightingSeg", "CtrLoRADentalPrompt")


@pytest.fixture(scope="module")
def graph(ui, comfy):
    """The example workflow loaded; the blend node's Load Image inputs set to the test images.

    Returns node ids by class, plus "lighting"/"segmentation" for those Load Image nodes.
    """
    page = ui.page
    page.evaluate("(wf) => app.loadGraphData(wf)", json.loads(EXAMPLE_WORKFLOW.read_text()))
    page.wait_for_timeout(1000)
    ui.load_messages = page.locator(".p-toast-message").all_inner_texts()
    for close in page.locator(".p-toast-close-button").all():  # a user closes them before working
        close.click()
    found = {t: page.evaluate(JS_NODE_IDS, t) for t in PANEL_NODES}
    assert all(found.values()), f"{EXAMPLE_WORKFLOW.name} lacks a CtrLoRA node: {found}"
    ids = {t: found_ids[0] for t, found_ids in found.items()}
    lighting_id, seg_id = page.evaluate(JS_UPSTREAM_IDS, ids["CtrLoRABlendLightingSeg"])
    assert lighting_id and seg_id, "the blend node's inputs must come from Load Image nodes"
    page.evaluate(JS_SET_WIDGET, [lighting_id, "image", comfy.images["lighting"].name])
    page.evaluate(JS_SET_WIDGET, [seg_id, "image", comfy.images["seg"].name])
    return {**ids, "lighting": lighting_id, "segmentation": seg_id}


def _focus(page, node_ids: list[int]) -> None:
    """Fit the canvas view around these nodes (for readable screenshots and real clicks)."""
    page.evaluate("""(ids) => {
        const rects = ids.map((id) => app.graph.getNodeById(id).boundingRect);
        const x = Math.min(...rects.map((r) => r[0])), y = Math.min(...rects.map((r) => r[1]));
        const w = Math.max(...rects.map((r) => r[0] + r[2])) - x, h = Math.max(...rects.map((r) => r[1] + r[3])) - y;
        app.canvas.ds.fitToBounds([x, y, w, h], { zoom: 0.6 });
        app.canvas.setDirty(true, true);
    }""", node_ids)
    page.wait_for_timeout(300)  # a few frames: DOM panels follow the canvas transform


def _screenshot(page, name: str) -> Path:
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


def _wait_panel(page, node_id: int, panel: str, expect_text: str) -> dict:
    page.wait_for_function(
        f"(args) => {{ const p = ({JS_PANEL})(args); return p && p.state !== 'loading' && "
        f"p.text.includes(args[2]); }}", arg=[node_id, panel, expect_text], timeout=PANEL_TIMEOUT_MS)
    return page.evaluate(JS_PANEL, [node_id, panel])


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _expected_blend(comfy, alpha: float, mode: str) -> np.ndarray:
    """Python reference: the core blend of the same PNGs, rounded to bytes."""
    lighting = np.asarray(Image.open(comfy.images["lighting"]).convert("RGB"), dtype=np.float64) / 255.0
    seg = np.asarray(Image.open(comfy.images["seg"]).convert("RGB"), dtype=np.float64) / 255.0
    return np.round(blend_lighting_seg(lighting, seg, alpha, mode) * 255.0).astype(np.uint8)


def _preview_pixels(page, node_id: int, alpha: float, mode: str) -> tuple[np.ndarray, dict]:
    page.wait_for_function(
        f"([id, alpha, mode]) => {{ const s = ({JS_PREVIEW_STATE})(id); "
        "return s.state === 'ready' && Number(s.alpha) === alpha && s.mode === mode; }",
        arg=[node_id, alpha, mode], timeout=PANEL_TIMEOUT_MS)
    shot = page.evaluate(JS_PREVIEW_PIXELS, node_id)
    assert shot["shown"], "the preview canvas is not visible in the node"
    pixels = np.array(shot["data"], dtype=np.uint8).reshape(shot["height"], shot["width"], 4)
    return pixels, shot


def test_example_workflow_loads_cleanly(ui, graph):
    assert not [m for m in ui.load_messages if "Invalid workflow" in m or "error" in m.lower()], ui.load_messages


def test_info_route_over_http(comfy):
    def info(folder: str, file: str, prefix: str = "") -> tuple[int, dict]:
        query = urllib.parse.urlencode({"folder": folder, "file": file})
        return _get(f"{comfy.url}{prefix}/ctrlora/info?{query}")

    status, body = info("ctrlora", "dental_lora.safetensors", prefix="/api")
    assert status == 200 and body["kind"] == "CtrLoRA condition LoRA" and body["rank"] == 4
    assert body["metadata"]["condition"] == LORA_METADATA["condition"]
    status, body = info("ctrlora", "official_lora.ckpt")
    assert status == 200 and "official checkpoint" in body["kind"] and body["metadata"] == {}
    secret = comfy.base.parent / "outside" / "secret.safetensors"
    refusals = {("checkpoints", "dental_lora.safetensors"): 404, ("ctrlora", "../outside/secret.safetensors"): 400,
                ("ctrlora", str(secret)): 400, ("ctrlora", "escape.safetensors"): 403,
                ("ctrlora", "missing.safetensors"): 404, ("ctrlora", "dental_lora.txt"): 400}
    for (folder, file), expected in refusals.items():
        status, body = info(folder, file)
        assert status == expected and body["error"], (folder, file, status, body)


def test_extension_is_served_once(comfy):
    status, scripts = _get(f"{comfy.url}/extensions")
    ours = [path for path in scripts if path.endswith("/ctrlora.js")]
    assert status == 200 and len(ours) == 1, f"ctrlora.js must be served once, got {ours}"


def test_loader_panels_show_file_metadata(ui, graph):
    page = ui.page
    lora, base = graph["CtrLoRALoRALoader"], graph["CtrLoRABaseLoader"]
    _focus(page, [lora, base])
    page.evaluate(JS_SET_WIDGET, [lora, "lora_name", "dental_lora.safetensors"])
    text = _wait_panel(page, lora, "ctrlora_info", "condition: dental")["text"]
    assert "kind: CtrLoRA condition LoRA, rank 4" in text
    for label, key in (("condition", "condition"), ("prompt template", "prompt_template"),
                       ("training steps", "training_steps"), ("resolution", "resolution"), ("maps", "maps"),
                       ("blend mode", "blend_mode"), ("blend alpha", "blend_alpha"),
                       ("region weights", "region_weights"), ("segmentation palette", "seg_palette")):
        assert f"{label}: {LORA_METADATA[key]}" in text

    page.evaluate(JS_SET_WIDGET, [base, "base_name", "ctrlora_base_small.safetensors"])
    text = _wait_panel(page, base, "ctrlora_info", "kind")["text"]
    assert "kind: CtrLoRA base ControlNet" in text and "no metadata" in text
    _screenshot(page, "01_loader_metadata.png")

    page.evaluate(JS_SET_WIDGET, [base, "base_name", "official_lora.ckpt"])
    text = _wait_panel(page, base, "ctrlora_info", "official checkpoint")["text"]
    assert "no metadata" in text
    page.evaluate(JS_SET_WIDGET, [base, "base_name", "escape.safetensors"])
    panel = _wait_panel(page, base, "ctrlora_info", "outside")
    assert panel["state"] == "error"


def test_blend_preview_follows_alpha_and_mode(ui, comfy, graph):
    page = ui.page
    blend = graph["CtrLoRABlendLightingSeg"]
    _focus(page, [graph["lighting"], graph["segmentation"], blend])
    page.evaluate(JS_SET_WIDGET, [blend, "mode", "alpha"])
    page.evaluate(JS_SET_WIDGET, [blend, "alpha", 0.5])
    before, shot = _preview_pixels(page, blend, 0.5, "alpha")
    expected = _expected_blend(comfy, shot["alpha"], "alpha")
    assert before.shape[:2] == expected.shape[:2] == (48, 64)
    for x, y in SAMPLE_POINTS:
        assert before[y, x, :3].tolist() == expected[y, x].tolist(), (x, y)
    assert np.array_equal(before[..., :3], expected)
    _screenshot(page, "02_blend_preview_alpha_0.5.png")

    page.evaluate(JS_SET_WIDGET, [blend, "alpha", 0.8])
    page.evaluate(JS_SET_WIDGET, [blend, "mode", "overlay"])
    after, shot = _preview_pixels(page, blend, 0.8, "overlay")
    assert not np.array_equal(after, before), "the preview did not change with alpha/mode"
    expected = _expected_blend(comfy, shot["alpha"], "overlay")
    for x, y in SAMPLE_POINTS:
        assert after[y, x, :3].tolist() == expected[y, x].tolist(), (x, y)
    assert np.array_equal(after[..., :3], expected)
    _screenshot(page, "03_blend_preview_alpha_0.8_overlay.png")

    # A real click on the mode combo's right arrow, as a user would: overlay -> soft_light.
    x, y = page.evaluate(JS_WIDGET_ARROW, [blend, "mode"])
    page.mouse.click(x, y)
    clicked, shot = _preview_pixels(page, blend, 0.8, "soft_light")
    assert np.array_equal(clicked[..., :3], _expected_blend(comfy, shot["alpha"], "soft_light"))


def test_blend_preview_placeholder_without_inputs(ui, graph):
    page = ui.page
    blend = graph["CtrLoRABlendLightingSeg"]
    page.evaluate("(id) => { app.graph.getNodeById(id).disconnectInput(1); app.graph.setDirtyCanvas(true, true); }",
                  blend)
    page.wait_for_function(f"(id) => ({JS_PREVIEW_STATE})(id).state === 'placeholder'", arg=blend,
                           timeout=PANEL_TIMEOUT_MS)
    assert "segmentation" in page.evaluate(JS_PREVIEW_STATE, blend)["title"]
    _screenshot(page, "04_blend_preview_placeholder.png")


def test_dental_prompt_is_shown_live(ui, graph):
    page = ui.page
    prompt = graph["CtrLoRADentalPrompt"]
    _focus(page, [prompt])
    page.evaluate(JS_SET_WIDGET, [prompt, "template", DEFAULT_TEMPLATE])
    page.evaluate(JS_SET_WIDGET, [prompt, "file_name", ""])
    page.evaluate(JS_SET_WIDGET, [prompt, "jaw", "lower"])
    page.evaluate(JS_SET_WIDGET, [prompt, "view", "left"])
    expected = PromptTemplate(DEFAULT_TEMPLATE).render("lower", "left")
    assert _wait_panel(page, prompt, "ctrlora_prompt", expected)["text"] == expected

    page.evaluate(JS_SET_WIDGET, [prompt, "file_name", "upper_front_0007.png"])
    expected = PromptTemplate(DEFAULT_TEMPLATE).for_file("upper_front_0007.png")
    assert _wait_panel(page, prompt, "ctrlora_prompt", expected)["text"] == expected
    _screenshot(page, "05_dental_prompt.png")

    page.evaluate(JS_SET_WIDGET, [prompt, "template", "{teeth} {view}"])
    panel = _wait_panel(page, prompt, "ctrlora_prompt", "unknown placeholder")
    assert panel["state"] == "error"


def test_panels_are_single_and_not_saved(ui, graph):
    page = ui.page
    ids = [graph[t] for t in PANEL_NODES]
    counts = page.evaluate("""(ids) => ids.map((id) => app.graph.getNodeById(id).widgets
                                .filter((w) => w.name.startsWith("ctrlora_")).length)""", ids)
    assert counts == [1, 1, 1, 1], "each CtrLoRA node gets exactly one panel (extension loaded once)"
    saved = page.evaluate("""(ids) => { const wf = app.graph.serialize();
        return ids.map((id) => JSON.stringify(wf.nodes.find((n) => n.id === id).widgets_values ?? [])); }""", ids)
    assert not any("ctrlora_" in values or "kind:" in values for values in saved)
    ours = [e for e in ui.console_errors if "ctrlora" in e.lower()]
    assert not ours, f"console errors from the extension: {ours}"


def test_front_end_without_dom_widgets_degrades_to_no_panels(ui, graph):
    """A front end lacking addDOMWidget: nodes are created as usual, without panels, without errors."""
    page = ui.page
    before = len(ui.console_errors)
    result = page.evaluate("""() => {
        const proto = LiteGraph.LGraphNode.prototype;
        const saved = [proto.addDOMWidget, console.info];
        const infos = [];
        delete proto.addDOMWidget;
        console.info = (...args) => infos.push(args.join(" "));
        try {
          const node = LiteGraph.createNode("CtrLoRALoRALoader");
          app.graph.add(node);
          const names = node.widgets.map((w) => w.name);
          app.graph.remove(node);
          return { names, infos };
        } finally {
          [proto.addDOMWidget, console.info] = saved;
        }
    }""")
    assert result["names"] == ["lora_name", "strength"]
    assert any("no DOM widgets" in line for line in result["infos"]), result["infos"]
    assert ui.console_errors[before:] == []
