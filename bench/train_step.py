"""Training-step speed and memory: our trainer's defaults vs the official recipe, same device, one run.

    python bench/train_step.py                 # GPU if available (full-size SD1.5 at 512^2), else CPU (small)
    python bench/train_step.py --end-to-end    # also: the 1k-pair recipe end to end (caching included)

Both modes train the same adapter on the same random-weight models with the same loss:

- official: fp32, batch 1, every step reads the pair from disk, VAE-encodes condition and target
  and encodes the prompt (what the official Lightning trainer does; no caching);
- ours: the trainer's defaults (`train/train_lora.py`: --precision auto = bf16 autocast on GPUs,
  --batch-size 1), latents and prompts from the cache (cache time reported separately), VAE and
  text encoder moved off the device; plus the same at a larger batch for reference.

Models: on GPU, SD1.5-sized models built from this project's classes (`TinyUNet` at the SD1.5
config = the SD1.5 UNet layout, 860M; a full-size CtrLoRA base; an SD-width autoencoder and a
CLIP-L-sized text encoder, both somewhat cheaper than the real ones, which favours the official
mode); on CPU, the miniature demo config. Each mode runs in its own process, so peak memory is
clean: CUDA max allocated on GPU, max RSS on CPU. Prints figures and ratios and writes
bench/results/train_step_<device>.json. Targets (GPU): >= 3x samples/s, <= 0.5x peak memory, and the
1k-pair recipe <= 5 min on one H100.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_device import device_label, results_path, write_report
from ctrlora_core.adapters import CtrLoRAAdapter
from ctrlora_core.config import ControlNetConfig
from ctrlora_core.random_weights import random_base, randomize_
from ctrlora_core.schedule import NoiseSchedule
from train.backbones.tiny import TinyBackbone
from train.backbones.tiny_models import TinyAutoencoder, TinyTextEncoder, TinyUNet
from train.dataset import check_dataset, load_pair
from train.devices import pick_device, resolve_precision
from train.latent_cache import cached_latents, cached_prompts
from train.train_lora import AdapterModule, TrainConfig, loss_on, make_batch, slot_generator



def write_pairs(folder: Path, count: int, size: int) -> Path:
    """count synthetic dental-named pairs of size x size (smooth random shapes)."""
    views = ("front", "top", "left", "right", "bottom")
    for sub in ("source", "target"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        rng = np.random.default_rng(i)
        cx, cy, r = rng.uniform(0.3, 0.7, 3) * (1, 1, 0.5)
        inside = ((x - cx) ** 2 + (y - cy) ** 2 < r**2)[..., None]
        colour = rng.uniform(0.2, 1.0, 3)
        name = f"{('upper', 'lower')[i % 2]}_{views[i % 5]}_{i:05d}.png"
        Image.fromarray((inside * colour * 255).astype(np.uint8)).save(folder / "source" / name)
        target = np.where(inside, colour * (1 - 0.5 * y[..., None]), 0.6)
        Image.fromarray((target * 255).astype(np.uint8)).save(folder / "target" / name)
    return folder


def sd15_sized_backbone(device: torch.device, dtype: torch.dtype) -> TinyBackbone:
    """Random models of SD1.5 size from this project's classes (see module docstring)."""
    config = ControlNetConfig()
    generator = torch.Generator().manual_seed(0)
    unet = TinyUNet(config)
    autoencoder = TinyAutoencoder(channels=(128, 256, 512, 512), groups=32)
    text = TinyTextEncoder(width=768, layers=12, heads=12, max_length=77, vocab_size=49408)
    for model in (unet, autoencoder, text):
        randomize_(model, generator)
    backbone = TinyBackbone(unet, autoencoder, text, random_base(config, 1), latent_scale=0.18215,
                            device=device, identity="bench-sd15-random")
    backbone.unet.to(dtype)
    backbone.controlnet.to(dtype)
    return backbone


def worker(mode: str, args: argparse.Namespace) -> dict:
    """One timed run in this process; returns its figures."""
    defaults = TrainConfig()
    device = pick_device(args.device, 0)
    official = mode == "official"
    autocast_dtype, weight_dtype = (None, torch.float32) if official else resolve_precision(defaults.precision, device)
    batch_size = 1 if official else (defaults.batch_size if mode == "ours" else args.large_batch)
    if args.preset == "sd15":
        backbone = sd15_sized_backbone(device, weight_dtype)
    else:
        backbone = TinyBackbone.random(0, device=device)
    pairs, _ = check_dataset(args.data)
    prompts = sorted({p.prompt for p in pairs})
    schedule = NoiseSchedule()
    cache_seconds = 0.0
    if not official:
        start = time.perf_counter()
        latents, _ = cached_latents(backbone, pairs, (args.size, args.size), None, backbone.identity,
                                    show_progress=False)
        table, _ = cached_prompts(backbone, [p.prompt for p in pairs], None, backbone.identity)
        backbone.release_encoders()
        cache_seconds = time.perf_counter() - start
    adapter = CtrLoRAAdapter.fresh(backbone.controlnet, defaults.rank, torch.Generator().manual_seed(0))
    module = AdapterModule(adapter, backbone).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=defaults.lr, weight_decay=defaults.weight_decay)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def step(number: int) -> None:
        indices = [(number * batch_size + b) % len(pairs) for b in range(batch_size)]
        generators = [slot_generator(0, 0, number * batch_size + b) for b in range(batch_size)]
        if official:  # read, encode and embed every step
            cond, target = load_pair(pairs[indices[0]])
            cond_m = backbone.encode_moments(cond[None].to(device)).cpu()
            target_m = backbone.encode_moments(target[None].to(device)).cpu()
            text = backbone.encode_text(["", pairs[indices[0]].prompt])
            batch = make_batch(cond_m, target_m, [1], text, generators, backbone.latent_scale, schedule,
                               defaults.prompt_dropout, device)
        else:
            batch = make_batch(latents.cond_moments[indices], latents.target_moments[indices],
                               [table.index(pairs[i].prompt) for i in indices], table.embeddings, generators,
                               backbone.latent_scale, schedule, defaults.prompt_dropout, device)
        loss_on(module, batch, autocast_dtype).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for number in range(args.warmup):
        step(number)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for number in range(args.warmup, args.warmup + args.steps):
        step(number)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"mode": mode, "batch_size": batch_size, "precision": str(autocast_dtype or torch.float32),
              "samples_per_s": args.steps * batch_size / seconds, "step_s": seconds / args.steps,
              "cache_s": cache_seconds, "prompts": len(prompts)}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_worker(mode: str, argv: list[str]) -> dict:
    """Run `worker(mode)` in a child process; add its max RSS."""
    command = [sys.executable, __file__, "--worker", mode, *argv]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} worker failed")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["max_rss_gib"] = usage.ru_maxrss / 2**20  # KiB on Linux
    return result


def end_to_end(args: argparse.Namespace, device: torch.device, folder: Path) -> dict:
    """The 1k-pair recipe (1000 pairs, 1000 steps, defaults) through train_lora.main, caching included."""
    from train import train_lora

    data = write_pairs(folder / "e2e_data", args.e2e_pairs, args.size)
    weights = folder / "weights"
    if args.preset == "sd15":
        sd15_sized_backbone(torch.device("cpu"), torch.float32).save(weights)
    else:
        TinyBackbone.random(0).save(weights)
    start = time.perf_counter()
    summary = train_lora.main(["--data", str(data), "--model", str(weights), "--out", str(folder / "e2e_run"),
                               "--steps", str(args.e2e_pairs), "--val-every", "0", "--save-every", "0",
                               "--log-every", "100", "--device", str(device)])
    return {"pairs": args.e2e_pairs, "steps": summary["steps"], "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--preset", choices=("auto", "sd15", "tiny"), default="auto",
                        help="model size: sd15 (GPU default) or tiny (CPU default)")
    parser.add_argument("--size", type=int, default=0, help="image size (default: 512 for sd15, 64 for tiny)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per mode (default: 50 GPU, 20 CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--large-batch", type=int, default=8, help="batch of the extra 'ours' run (0 = skip)")
    parser.add_argument("--end-to-end", action="store_true", help="also time the 1k-pair recipe end to end")
    parser.add_argument("--e2e-pairs", type=int, default=1000, help="pairs (= steps) of the end-to-end run")
    parser.add_argument("--data", default="", help=argparse.SUPPRESS)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    device = pick_device(args.device, 0)
    args.preset = args.preset if args.preset != "auto" else ("sd15" if device.type == "cuda" else "tiny")
    args.size = args.size or (512 if args.preset == "sd15" else 64)
    args.steps = args.steps or (50 if device.type == "cuda" else 20)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_pairs(Path(tmp) / "data", 32, args.size)
        argv = ["--device", str(device), "--preset", args.preset, "--size", str(args.size), "--steps",
                str(args.steps), "--warmup", str(args.warmup), "--large-batch", str(args.large_batch),
                "--data", str(data)]
        runs = {"official": run_worker("official", argv), "ours": run_worker("ours", argv)}
        if args.large_batch:
            runs["ours_large_batch"] = run_worker("ours_large_batch", argv)
        e2e = end_to_end(args, device, Path(tmp)) if args.end_to_end else None

    memory_key = "peak_memory_gib" if device.type == "cuda" else "max_rss_gib"
    official, ours = runs["official"], runs["ours"]
    ratios = {"samples_per_s": ours["samples_per_s"] / official["samples_per_s"],
              "peak_memory": ours[memory_key] / official[memory_key]}
    gpu = device.type == "cuda"
    label = device_label(gpu)
    print(f"device {device} ({label}), preset {args.preset}, {args.size}x{args.size}, {args.steps} timed steps")
    for name, run in runs.items():
        print(f"  {name:17s} batch {run['batch_size']:2d} {run['precision']:15s} "
              f"{run['samples_per_s']:8.2f} samples/s  {run['step_s'] * 1000:8.1f} ms/step  "
              f"memory {run[memory_key]:6.2f} GiB  cache {run['cache_s']:.1f} s")
    print(f"ratios ours/official: samples/s {ratios['samples_per_s']:.2f}x (target >= 3x on GPU), "
          f"peak memory {ratios['peak_memory']:.2f}x (target <= 0.5x on GPU; {memory_key})")
    if e2e:
        print(f"end to end: {e2e['pairs']} pairs, {e2e['steps']} steps in {e2e['seconds']:.0f} s "
              f"(target <= 300 s on one H100)")
    write_report(results_path("train_step", gpu), {
        "device": label, "device_type": device.type, "preset": args.preset, "size": args.size, "torch": torch.__version__,
        "runs": runs, "ratios": ratios, "memory_measure": memory_key, "end_to_end": e2e})


if __name__ == "__main__":
    main()
