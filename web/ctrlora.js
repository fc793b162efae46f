// ComfyUI-CtrLoRA front-end extension. Adds read-only panels (DOM widgets) to four nodes:
//   Load CtrLoRA Base / Load CtrLoRA LoRA: the picked file's kind, rank and metadata,
//     from GET /ctrlora/info (nodes/info_route.py; safetensors header only).
//   Blend Lighting + Segmentation: a live preview of the blend of the two images fed by
//     Load Image nodes, recomputed in the browser (lib/blend.js) whenever alpha, mode or
//     the inputs change; no prompt is queued.
//   Dental Prompt: the resulting prompt text (lib/prompt.js).
// Panels are never serialized, so workflows stay the same with or without this file.
// On a front end without DOM widgets the extension does nothing (the nodes still work).
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { FLATTEN_COLOURS, blendRGBA } from "./lib/blend.js";
import { dentalPrompt } from "./lib/prompt.js";

const LOG_PREFIX = "[ComfyUI-CtrLoRA]";
const INFO_FOLDERS = ["ctrlora", "controlnet"];
const METADATA_FIELDS = [
  ["condition", "condition"],
  ["prompt_template", "prompt template"],
  ["training_steps", "training steps"],
  ["resolution", "resolution"],
  ["maps", "maps"],
  ["blend_mode", "blend mode"],
  ["blend_alpha", "blend alpha"],
  ["region_weights", "region weights"],
  ["seg_palette", "segmentation palette"],
];
const IMAGE_CACHE_SIZE = 8;

// ---------------------------------------------------------------- shared helpers

/** Wrap a node/widget callback so `extra` runs after the original one. */
function chain(original, extra) {
  return function (...args) {
    const result = original?.apply(this, args);
    extra();
    return result;
  };
}

function widgetValue(node, name) {
  return node.widgets?.find((widget) => widget.name === name)?.value;
}

function isLinked(node, inputName) {
  return node.inputs?.some((input) => input.name === inputName && input.link != null) ?? false;
}

/**
 * Call `update` now and whenever the node may have changed: widget edits, links, graph
 * load, and each redraw of the node (so edits on upstream nodes are seen too).
 * `update` must return quickly when nothing it depends on changed.
 */
function watchNode(node, update) {
  let warned = false; // run() is called on every redraw: log a failure once
  const run = () => {
    try {
      update();
    } catch (err) {
      if (!warned) console.warn(LOG_PREFIX, `panel of ${node.comfyClass} failed`, err);
      warned = true;
    }
  };
  node.onConfigure = chain(node.onConfigure, run);
  node.onConnectionsChange = chain(node.onConnectionsChange, run);
  node.onDrawForeground = chain(node.onDrawForeground, run);
  for (const widget of node.widgets ?? []) widget.callback = chain(widget.callback, run);
  run();
}

/** Add `element` below the node's widgets as a panel that is not saved with the workflow. */
function addPanel(node, name, element, minHeight) {
  const widget = node.addDOMWidget(name, "ctrlora_panel", element, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => minHeight,
  });
  widget.serialize = false;
  const [width, height] = node.computeSize();
  node.setSize([Math.max(width, node.size[0], 320), Math.max(height, node.size[1])]);
  return widget;
}

function makeTextPanel(className) {
  const element = document.createElement("div");
  element.className = `ctrlora-panel ${className}`;
  Object.assign(element.style, {
    boxSizing: "border-box",
    padding: "4px 6px",
    fontSize: "11px",
    lineHeight: "1.35",
    whiteSpace: "pre-wrap",
    overflowWrap: "anywhere",
    overflowY: "auto",
    color: "var(--input-text, #ddd)",
    background: "var(--comfy-input-bg, #222)",
    borderRadius: "4px",
  });
  return element;
}

function showText(element, text, isError = false) {
  element.textContent = text;
  element.dataset.state = isError ? "error" : "ok";
  element.style.color = isError ? "var(--error-text, #ff6b6b)" : "var(--input-text, #ddd)";
}

// ---------------------------------------------------------------- loader metadata panel

/** Text lines for a /ctrlora/info answer. */
function describeInfo(info) {
  const metadata = info.metadata ?? {};
  const rank = info.rank ?? metadata.rank;
  const lines = [`kind: ${info.kind}${rank != null ? `, rank ${rank}` : ""}`];
  const known = METADATA_FIELDS.filter(([key]) => metadata[key] != null && metadata[key] !== "");
  for (const [key, label] of known) lines.push(`${label}: ${metadata[key]}`);
  if (!Object.keys(metadata).length) lines.push("no metadata");
  return lines.join("\n");
}

async function fetchInfo(file) {
  const errors = [];
  for (const folder of INFO_FOLDERS) {
    const response = await api.fetchApi(`/ctrlora/info?${new URLSearchParams({ folder, file })}`);
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (response.ok) return { text: describeInfo(body), isError: false };
    errors.push(body.error ?? `HTTP ${response.status}`);
    if (response.status !== 404) break;
  }
  return { text: errors.join("\n"), isError: true };
}

function setupLoaderInfo(node, fileWidgetName) {
  const panel = makeTextPanel("ctrlora-info");
  addPanel(node, "ctrlora_info", panel, 100);
  let shownFile = null;
  watchNode(node, () => {
    const file = widgetValue(node, fileWidgetName);
    if (file === shownFile) return;
    shownFile = file;
    if (!file) {
      showText(panel, "no file selected");
      return;
    }
    showText(panel, `reading ${file} ...`);
    panel.dataset.state = "loading";
    fetchInfo(file)
      .catch((err) => ({ text: `cannot reach the server: ${err.message}`, isError: true }))
      .then(({ text, isError }) => {
        if (shownFile === file) showText(panel, text, isError);
      });
  });
}

// ---------------------------------------------------------------- blend preview

/** URL of the image an input is fed with: a Load Image file, or an image the node shows. */
function inputImageUrl(node, inputName) {
  const slot = node.inputs?.findIndex((input) => input.name === inputName) ?? -1;
  const origin = slot >= 0 ? node.getInputNode(slot) : null;
  if (!origin) return null;
  const file = widgetValue(origin, "image");
  if (typeof file === "string" && file) return viewUrl(file);
  return origin.imgs?.[0]?.src ?? null;
}

/** /view URL for a Load Image value: "name.png", "sub/name.png", maybe with " [output]". */
function viewUrl(value) {
  const annotated = /^(.*) \[(input|output|temp)\]$/.exec(value);
  const path = annotated ? annotated[1] : value;
  const cut = path.lastIndexOf("/");
  const params = new URLSearchParams({
    filename: path.slice(cut + 1),
    subfolder: cut >= 0 ? path.slice(0, cut) : "",
    type: annotated ? annotated[2] : "input",
  });
  return api.apiURL(`/view?${params}`);
}

const imageCache = new Map();

/** Pixels of the image at `url` as ImageData (cached for the last few URLs). */
function loadImageData(url) {
  if (!imageCache.has(url)) {
    const pending = new Promise((resolve, reject) => {
      const image = new Image();
      image.onload = () => {
        const canvas = document.createElement("canvas");
        canvas.width = image.naturalWidth;
        canvas.height = image.naturalHeight;
        const context = canvas.getContext("2d", { willReadFrequently: true });
        context.drawImage(image, 0, 0);
        resolve(context.getImageData(0, 0, canvas.width, canvas.height));
      };
      image.onerror = () => reject(new Error(`cannot load ${url}`));
      image.src = url;
    });
    pending.catch(() => imageCache.delete(url));
    imageCache.set(url, pending);
    if (imageCache.size > IMAGE_CACHE_SIZE) imageCache.delete(imageCache.keys().next().value);
  }
  return imageCache.get(url);
}

function drawPlaceholder(canvas, message) {
  canvas.width = 320;
  canvas.height = 160;
  const context = canvas.getContext("2d");
  context.fillStyle = "#2a2a2a";
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.strokeStyle = "#777";
  context.setLineDash([6, 4]);
  context.strokeRect(4, 4, canvas.width - 8, canvas.height - 8);
  context.fillStyle = "#ccc";
  context.font = "14px sans-serif";
  context.textAlign = "center";
  const words = message.split(" ");
  const lines = [""];
  for (const word of words) {
    const candidate = lines[lines.length - 1] ? `${lines[lines.length - 1]} ${word}` : word;
    if (context.measureText(candidate).width > canvas.width - 24) lines.push(word);
    else lines[lines.length - 1] = candidate;
  }
  const top = canvas.height / 2 - ((lines.length - 1) * 18) / 2;
  lines.forEach((line, i) => context.fillText(line, canvas.width / 2, top + i * 18));
  canvas.dataset.state = "placeholder";
  canvas.title = message;
}

function setupBlendPreview(node) {
  const container = document.createElement("div");
  container.className = "ctrlora-panel ctrlora-blend";
  Object.assign(container.style, { display: "flex", justifyContent: "center", alignItems: "center" });
  const canvas = document.createElement("canvas");
  canvas.className = "ctrlora-blend-preview";
  canvas.dataset.nodeId = String(node.id);
  Object.assign(canvas.style, { width: "100%", height: "100%", objectFit: "contain" });
  container.append(canvas);
  addPanel(node, "ctrlora_preview", container, 220);

  let currentKey = null;
  watchNode(node, () => {
    canvas.dataset.nodeId = String(node.id);
    const urls = ["lighting", "segmentation"].map((name) => inputImageUrl(node, name));
    const alpha = widgetValue(node, "alpha");
    const mode = widgetValue(node, "mode");
    // a connected mask input flattens that map as the node does (assumed to be its Load Image's mask)
    const flatten = Object.fromEntries(
      ["lighting", "segmentation"]
        .filter((name) => isLinked(node, `${name}_mask`))
        .map((name) => [name, FLATTEN_COLOURS[name]]),
    );
    const key = JSON.stringify([urls, alpha, mode, flatten]);
    if (key === currentKey) return;
    currentKey = key;
    renderBlend(canvas, urls, alpha, mode, flatten, () => key === currentKey).catch((err) => {
      if (key === currentKey) drawPlaceholder(canvas, err.message);
    });
  });
}

async function renderBlend(canvas, urls, alpha, mode, flatten, stillWanted) {
  const missing = ["lighting", "segmentation"].filter((_, i) => !urls[i]);
  if (missing.length) {
    const what = missing.length === 1 ? "a Load Image node" : "Load Image nodes";
    drawPlaceholder(canvas, `Connect ${what} to ${missing.join(" and ")} for a live preview`);
    return;
  }
  canvas.dataset.state = "loading";
  const [lighting, seg] = await Promise.all(urls.map(loadImageData));
  if (!stillWanted()) return;
  if (lighting.width !== seg.width || lighting.height !== seg.height) {
    drawPlaceholder(
      canvas,
      `lighting (${lighting.width}x${lighting.height}) and segmentation (${seg.width}x${seg.height}) differ in size`,
    );
    return;
  }
  const pixels = blendRGBA(lighting.data, seg.data, alpha, mode, flatten);
  canvas.width = lighting.width;
  canvas.height = lighting.height;
  canvas.getContext("2d").putImageData(new ImageData(pixels, lighting.width, lighting.height), 0, 0);
  Object.assign(canvas.dataset, { state: "ready", alpha: String(alpha), mode });
  canvas.title = `${mode} blend, alpha ${alpha}`;
}

// ---------------------------------------------------------------- dental prompt text

const PROMPT_WIDGETS = ["jaw", "view", "template", "file_name"];

function setupDentalPrompt(node) {
  const panel = makeTextPanel("ctrlora-prompt");
  addPanel(node, "ctrlora_prompt", panel, 60);
  let currentKey = null;
  watchNode(node, () => {
    const linked = PROMPT_WIDGETS.filter((name) => isLinked(node, name));
    const values = PROMPT_WIDGETS.map((name) => widgetValue(node, name));
    const key = JSON.stringify([linked, values]);
    if (key === currentKey) return;
    currentKey = key;
    if (linked.length) {
      showText(panel, `${linked.join(", ")} come from a connected node: the prompt is known when the workflow runs`);
      return;
    }
    const [jaw, view, template, fileName] = values;
    try {
      showText(panel, dentalPrompt({ jaw, view, template: template ?? "", fileName: fileName ?? "" }));
    } catch (err) {
      showText(panel, err.message, true);
    }
  });
}

// ---------------------------------------------------------------- registration

const SETUPS = {
  CtrLoRABaseLoader: (node) => setupLoaderInfo(node, "base_name"),
  CtrLoRALoRALoader: (node) => setupLoaderInfo(node, "lora_name"),
  CtrLoRABlendLightingSeg: setupBlendPreview,
  CtrLoRADentalPrompt: setupDentalPrompt,
};

let warnedNoDomWidgets = false;

app.registerExtension({
  name: "ComfyUI-CtrLoRA.panels",
  nodeCreated(node) {
    const setup = SETUPS[node.comfyClass];
    if (!setup) return;
    if (typeof node.addDOMWidget !== "function") {
      if (!warnedNoDomWidgets) console.info(LOG_PREFIX, "this front end has no DOM widgets: panels are off");
      warnedNoDomWidgets = true;
      return;
    }
    try {
      setup(node);
    } catch (err) {
      console.warn(LOG_PREFIX, `panel for ${node.comfyClass} failed`, err);
    }
  },
});
