"""Evaluate a CtrLoRA LoRA on a held-out folder: sample every pair, compare with the targets.

    python train/evaluate.py --lora runs/x/lora.safetensors --data heldout/ --model sd15.safetensors --base base.ckpt

Per pair, with the official inference settings (DDIM 20 steps, eta 0, CFG 7.5 with the empty
prompt as negative, the condition in both passes):

- PSNR and SSIM of the sample against the target (restoration-style metrics);
- condition fidelity: the correlation between the Sobel edge maps of the sample and of the
  condition image (a detector-free proxy for "the structure of the condition is in the
  output", meaningful for the dental set where the condition outlines the teeth).

Without --lora the Base ControlNet alone is evaluated (a baseline). Writes metrics.json
(per pair and means) and grid PNGs (condition | sample | target) into --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

try:  # installed by name (`pip install -e .`); a clear message instead of a bare ModuleNotFoundError
    import ctrlora_core  # noqa: F401
except ModuleNotFoundError:
    sys.exit("error: the pack is not installed in this Python; run once: "
             "python -m pip install --no-deps -e <the pack's folder>   (README: Trainer > Install)")

from ctrlora_core.adapters import CtrLoRAAdapter
from ctrlora_core.errors import CtrLoRAError
from ctrlora_core.formats import load_adapter
from ctrlora_core.prompts import DEFAULT_TEMPLATE, PromptTemplate
from train.backbones import open_backbone
from train.backbones.backbone import sample_latent
from train.dataset import check_dataset, image_size, load_pair
from train.devices import pick_device, resolve_precision
from train.latent_cache import cached_latents, cached_prompts
from train.metrics import edge_correlation, psnr, ssim
from train.sampling import sample_images, save_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="held-out dataset folder (official or dental layout)")
    parser.add_argument("--lora", default="", help="CtrLoRA LoRA file to evaluate (default: the base alone)")
    parser.add_argument("--model", required=True, help="SD checkpoint, tiny weights folder or 'tiny-random[:SEED]'")
    parser.add_argument("--base", default="", help="CtrLoRA Base ControlNet file (optional for a tiny folder)")
    parser.add_argument("--comfyui", default="", help="ComfyUI folder (default: $COMFYUI_PATH or the pack's ComfyUI)")
    parser.add_argument("--prompt-template", default=DEFAULT_TEMPLATE, help="dental layout: prompt from file names")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    parser.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of condition latents and start noise (default: 0)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs sampled together (default: 4)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N pairs (0 = all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="autocast precision (default: auto = bf16 on CUDA, else fp32)")
    parser.add_argument("--out", default="eval", help="output folder for metrics.json and grids (default: eval)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Evaluate; returns the metrics dict written to metrics.json."""
    args = parse_args(argv)
    device = pick_device(args.device, 0)
    autocast_dtype, weight_dtype = resolve_precision(args.precision, device)
    backbone = open_backbone(args.model, args.base, args.comfyui, device, weight_dtype)
    pairs, _ = check_dataset(args.data, PromptTemplate(args.prompt_template))
    pairs = pairs[: args.limit] if args.limit else pairs
    size = image_size(pairs[0].target)
    if args.lora:
        adapter = load_adapter(args.lora, backbone.controlnet)
    else:  # a fresh adapter computes exactly the base
        adapter = CtrLoRAAdapter.fresh(backbone.controlnet, 1)
    latents, _ = cached_latents(backbone, pairs, size, None, backbone.identity)
    prompts, _ = cached_prompts(backbone, [p.prompt for p in pairs], None, backbone.identity)
    hints = sample_latent(latents.cond_moments, backbone.latent_scale, torch.Generator().manual_seed(args.seed))
    out = Path(args.out)
    records = []
    for start in range(0, len(pairs), args.batch_size):
        chunk = pairs[start:start + args.batch_size]
        context = prompts.embeddings[[prompts.index(p.prompt) for p in chunk]]
        samples = sample_images(backbone, adapter, hints[start:start + len(chunk)], context, prompts.embeddings[:1],
                                args.steps, args.cfg, args.seed + start, autocast_dtype)
        loaded = [load_pair(p) for p in chunk]
        conditions = torch.stack([c for c, _ in loaded])
        targets = torch.stack([(t + 1.0) / 2.0 for _, t in loaded])
        save_grid(out / f"grid_{start // args.batch_size:03d}.png", conditions, samples, targets)
        for pair, p, s, e in zip(chunk, psnr(samples, targets), ssim(samples, targets),
                                 edge_correlation(samples, conditions)):
            records.append({"name": pair.name, "psnr": float(p), "ssim": float(s), "condition_fidelity": float(e)})
    means = {key: sum(r[key] for r in records) / len(records) for key in ("psnr", "ssim", "condition_fidelity")}
    metrics = {"lora": args.lora or None, "data": args.data, "steps": args.steps, "cfg": args.cfg, "seed": args.seed,
               "pairs": len(records), "mean": means, "per_pair": records}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"{len(records)} pairs: PSNR {means['psnr']:.2f} dB, SSIM {means['ssim']:.4f}, "
          f"condition fidelity (edge correlation) {means['condition_fidelity']:.4f} -> {out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except CtrLoRAError as err:
        sys.exit(f"error: {err}")
