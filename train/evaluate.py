"""Evaluate a CtrLoRA LoRA on a held-out folder: trained vs untrained vs no control.

    python train/evaluate.py --lora runs/x/lora.safetensors --data heldout/ --model sd15.safetensors --base base.ckpt

Every pair is sampled three times with the same condition latents, prompt and start noise:

- trained: the Base ControlNet with the LoRA (--lora);
- untrained: the Base ControlNet with a fresh adapter, which computes exactly the base alone;
- no control: the UNet without any ControlNet residuals.

Sampling follows the official inference (DDIM, eta 0, CFG with the empty prompt as negative and
the condition in both passes; --steps and --cfg). Metrics per sample (train/metrics.py): SSIM and
PSNR against the target, the high-frequency energy ratio and the Sobel-edge correlation with the
condition; with a segmentation map (maps layout) also the teeth-region PSNR and the boundary F1
of the tooth/gum boundary (tolerance --boundary-tolerance pixels). The target's own boundary F1
is reported as the reference (real photos have edges besides the boundary, so it is below 1).
LPIPS is absent: see train/metrics.py.

The maps layout's options (--maps, --blend-alpha, --blend-mode, --seg-palette, --seg-tolerance)
default to what the LoRA's metadata records, so a LoRA is evaluated on conditions made as in its
training. Writes into --out: metrics.json (per pair and means), metrics.md (a Markdown table)
and grid PNGs with one row per pair: condition | trained | untrained | no control | target;
with --save-samples also every sample as samples/<variant>/<target name>.png and every
condition as samples/condition/<target name>.png.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

try:  # installed by name (`pip install -e .`); a clear message instead of a bare ModuleNotFoundError
    import ctrlora_core  # noqa: F401
except ModuleNotFoundError:
    sys.exit("error: the pack is not installed in this Python; run once: "
             "python -m pip install --no-deps -e <the pack's folder>   (README: Trainer > Install)")

from ctrlora_core.adapters import CtrLoRAAdapter
from ctrlora_core.conditions import DENTAL_BLEND_ALPHA, SEG_TOLERANCE, load_map, region_masks
from ctrlora_core.errors import CtrLoRAError
from ctrlora_core.files import write_json
from ctrlora_core.formats import load_adapter
from ctrlora_core.prompts import DEFAULT_TEMPLATE, PromptTemplate
from train.backbones import open_backbone
from train.backbones.backbone import sample_latent
from train.dataset import SEGMENTATION, MapBlend, check_dataset, image_size, load_pair
from train.devices import pick_device, resolve_precision
from train.latent_cache import cached_latents, cached_prompts
from train.metrics import (
    BOUNDARY_TOLERANCE,
    EDGE_THRESHOLD,
    HF_CUTOFF,
    boundary_f1,
    dental_metrics,
    edge_correlation,
    region_boundary,
)
from train.regions import parse_palette
from train.sampling import sample_images, save_grid

VARIANTS = {"trained": "trained LoRA", "untrained": "untrained (base alone)", "no_control": "no control (UNet alone)"}
COLUMNS = {"ssim": "SSIM", "psnr": "PSNR (dB)", "boundary_f1": "boundary F1", "teeth_psnr": "teeth PSNR (dB)",
           "hf_energy_ratio": "HF energy ratio", "condition_fidelity": "edge corr. with condition"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="held-out dataset folder (official, dental or maps layout)")
    parser.add_argument("--lora", default="", help="CtrLoRA LoRA file to evaluate (default: only the untrained "
                                                   "and no-control baselines)")
    parser.add_argument("--model", required=True, help="SD checkpoint, tiny weights folder or 'tiny-random[:SEED]'")
    parser.add_argument("--base", default="", help="CtrLoRA Base ControlNet file (optional for a tiny folder)")
    parser.add_argument("--comfyui", default="", help="ComfyUI folder (default: $COMFYUI_PATH or the pack's ComfyUI)")
    parser.add_argument("--prompt-template", default=DEFAULT_TEMPLATE, help="prompt from file names (dental and "
                                                                            "maps layouts)")
    parser.add_argument("--maps", default=None, help="maps layout: maps in blend order, e.g. lighting,segmentation "
                                                     "(default: the LoRA's metadata; none = official/dental layout)")
    parser.add_argument("--blend-alpha", type=float, default=None,
                        help=f"maps layout: blend alpha (default: the LoRA's metadata, else {DENTAL_BLEND_ALPHA})")
    parser.add_argument("--blend-mode", default=None, help="maps layout: blend mode (default: the LoRA's metadata, "
                                                           "else alpha)")
    parser.add_argument("--seg-palette", default=None, help="segmentation colours, e.g. teeth=#C4C474 (default: the "
                                                            "LoRA's metadata, else the dental palette)")
    parser.add_argument("--seg-tolerance", type=float, default=None, help="largest distance of a region pixel from "
                        f"its colour, 8-bit RGB units (default: the LoRA's metadata, else {SEG_TOLERANCE:g})")
    parser.add_argument("--boundary-tolerance", type=int, default=BOUNDARY_TOLERANCE,
                        help=f"boundary F1: pixels an edge may lie off the boundary (default: {BOUNDARY_TOLERANCE})")
    parser.add_argument("--edge-threshold", type=float, default=EDGE_THRESHOLD,
                        help=f"boundary F1: Sobel gradient / 8 of an edge pixel (default: {EDGE_THRESHOLD})")
    parser.add_argument("--hf-cutoff", type=float, default=HF_CUTOFF,
                        help=f"HF energy ratio: lowest frequency counted, cycles/pixel (default: {HF_CUTOFF})")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    parser.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of condition latents and start noise (default: 0)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs sampled together (default: 4)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N pairs (0 = all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="autocast precision (default: auto = bf16 on CUDA, else fp32)")
    parser.add_argument("--out", default="eval", help="output folder for metrics.json, metrics.md and grids "
                                                      "(default: eval)")
    parser.add_argument("--save-samples", action="store_true", help="also write every sample as "
                        "OUT/samples/<variant>/<target name>.png (variants: trained, untrained, no_control) and "
                        "every condition as OUT/samples/condition/<target name>.png")
    return parser.parse_args(argv)


def _finite(value: float) -> float | None:
    """None for NaN, which marks a metric that does not apply (e.g. no tooth/gum boundary in a pair)."""
    return value if math.isfinite(value) else None


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values that apply (None when none does)."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if key in ("ssim", "boundary_f1") else f"{value:.2f}"


def markdown_table(means: dict[str, dict[str, float | None]], target_f1: float | None) -> str:
    """The means as a Markdown table, one row per variant, plus the target's boundary F1."""
    keys = [k for k in COLUMNS if any(m.get(k) is not None for m in means.values())]
    lines = ["| | " + " | ".join(COLUMNS[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for variant, values in means.items():
        cells = [_cell(k, values.get(k)) for k in keys]
        lines.append(f"| {VARIANTS[variant]} | " + " | ".join(cells) + " |")
    if target_f1 is not None and "boundary_f1" in keys:
        cells = [_cell(k, target_f1) if k == "boundary_f1" else "" for k in keys]
        lines.append("| target (reference) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Evaluate; returns the metrics dict written to metrics.json."""
    args = parse_args(argv)
    device = pick_device(args.device, 0)
    autocast_dtype, weight_dtype = resolve_precision(args.precision, device)
    backbone = open_backbone(args.model, args.base, args.comfyui, device, weight_dtype)
    adapters: dict[str, CtrLoRAAdapter | None] = {}
    recorded: dict[str, str] = {}
    if args.lora:
        adapters["trained"] = load_adapter(args.lora, backbone.controlnet)
        recorded = adapters["trained"].metadata
    adapters["untrained"] = CtrLoRAAdapter.fresh(backbone.controlnet, 1)  # computes exactly the base
    adapters["no_control"] = None

    maps = args.maps if args.maps is not None else recorded.get("maps", "")
    palette = parse_palette(args.seg_palette if args.seg_palette is not None else recorded.get("seg_palette", ""))
    tolerance = args.seg_tolerance if args.seg_tolerance is not None else float(recorded.get("seg_tolerance",
                                                                                             SEG_TOLERANCE))
    blend = None
    if maps:
        alpha = args.blend_alpha if args.blend_alpha is not None else float(recorded.get("blend_alpha",
                                                                                         DENTAL_BLEND_ALPHA))
        mode = args.blend_mode if args.blend_mode is not None else recorded.get("blend_mode", "alpha")
        blend = MapBlend.parse(maps, alpha, mode, palette["background"])
    pairs, _ = check_dataset(args.data, PromptTemplate(args.prompt_template), blend=blend)
    pairs = pairs[: args.limit] if args.limit else pairs
    size = image_size(pairs[0].target)
    latents, _ = cached_latents(backbone, pairs, size, None, backbone.identity)
    prompts, _ = cached_prompts(backbone, [p.prompt for p in pairs], None, backbone.identity)
    hints = sample_latent(latents.cond_moments, backbone.latent_scale, torch.Generator().manual_seed(args.seed))
    out = Path(args.out)
    records: dict[str, list[dict]] = {variant: [] for variant in adapters}
    target_f1: list[float | None] = []
    for start in range(0, len(pairs), args.batch_size):
        chunk = pairs[start:start + args.batch_size]
        context = prompts.embeddings[[prompts.index(p.prompt) for p in chunk]]
        loaded = [load_pair(p) for p in chunk]
        conditions = torch.stack([c for c, _ in loaded])
        targets = torch.stack([(t + 1.0) / 2.0 for _, t in loaded])
        teeth = gum = None
        seg_files = [p.map_file(SEGMENTATION) for p in chunk]
        if all(seg_files):
            masks = [region_masks(load_map(f, blend.seg_background), palette, tolerance) for f in seg_files]
            teeth = torch.stack([torch.from_numpy(m["teeth"]) for m in masks])
            gum = torch.stack([torch.from_numpy(m["gum"]) for m in masks])
            target_f1 += [_finite(v) for v in boundary_f1(targets, region_boundary(teeth, gum),
                                                          args.boundary_tolerance, args.edge_threshold).tolist()]
        samples = {}
        for variant, adapter in adapters.items():
            samples[variant] = sample_images(backbone, adapter, hints[start:start + len(chunk)], context,
                                             prompts.embeddings[:1], args.steps, args.cfg, args.seed + start,
                                             autocast_dtype)
            metrics = dental_metrics(samples[variant], targets, teeth, gum, args.boundary_tolerance,
                                     args.edge_threshold, args.hf_cutoff)
            metrics["condition_fidelity"] = edge_correlation(samples[variant], conditions)
            for i, pair in enumerate(chunk):
                records[variant].append({"name": pair.name, **{k: _finite(float(v[i])) for k, v in metrics.items()}})
        save_grid(out / f"grid_{start // args.batch_size:03d}.png", conditions, *samples.values(), targets)
        if args.save_samples:
            for folder, images in {"condition": conditions, **samples}.items():
                for pair, image in zip(chunk, images):
                    save_grid(out / "samples" / folder / f"{pair.target.stem}.png", image[None])

    means = {variant: {k: _mean([r[k] for r in rows]) for k in rows[0] if k != "name"}
             for variant, rows in records.items()}
    result = {
        "lora": args.lora or None, "data": args.data, "pairs": len(pairs),
        "settings": {"steps": args.steps, "cfg": args.cfg, "seed": args.seed, "maps": maps or None,
                     "blend_alpha": blend.alpha if blend else None, "blend_mode": blend.mode if blend else None,
                     "boundary_tolerance_px": args.boundary_tolerance, "edge_threshold": args.edge_threshold,
                     "hf_cutoff_cycles_per_px": args.hf_cutoff, "grid_columns": ["condition", *adapters, "target"]},
        "target_boundary_f1": _mean(target_f1),
        "mean": means,
        "per_pair": records,
    }
    write_json(out / "metrics.json", result)
    table = markdown_table(means, result["target_boundary_f1"])
    (out / "metrics.md").write_text(f"{len(pairs)} held-out pairs of {args.data}, {args.steps} DDIM steps, CFG "
                                    f"{args.cfg:g}, seed {args.seed}\n\n{table}")
    print(table + f"-> {out / 'metrics.json'}, {out / 'metrics.md'}, grids in {out}")
    return result


if __name__ == "__main__":
    try:
        main()
    except CtrLoRAError as err:
        sys.exit(f"error: {err}")
