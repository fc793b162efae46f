"""The bundled demo (`make demo`): train a CtrLoRA LoRA for a new condition, on a CPU, in minutes.

No Stable Diffusion weights can ship with this repository, so the demo runs the real code
on a miniature configuration (see the README section "Demo"):

1. generate a procedural dental dataset (`synth_dental.py`): teeth arches, upper/lower x
   top/front/bottom/left/right; condition = lighting map blended with a per-tooth
   segmentation map (`ctrlora_core.conditions.blend_lighting_seg`), target = a shaded
   render; prompts come from the file names (`upper_front_0001.png`);
2. train a LoRA for that condition with the real trainer (`train_lora.main`), on the
   miniature pretrained models in demo/weights (made by `pretrain_demo.py`), whose Base
   ControlNet has never seen this condition;
3. sample the held-out pairs with the trained LoRA and with an untrained (fresh) one, which
   is exactly the Base ControlNet, from the same noise, and compare both to the targets.

Writes to --out: lora.safetensors, preview.png (condition | untrained | trained | target),
report.md and report.json, samples/, data/ and the trainer's log.jsonl.

    python demo/run_demo.py --out demo_out
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

# Shared CPUs: OpenMP threads that spin while waiting slow everything down ~10x when another
# process holds a core; waiting passively costs almost nothing on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ctrlora_core.adapters import CtrLoRAAdapter  # noqa: E402
from ctrlora_core.conditions import tensor_to_image  # noqa: E402
from ctrlora_core.files import atomic_write, file_sha256  # noqa: E402
from ctrlora_core.formats import load_adapter  # noqa: E402
from demo import synth_dental  # noqa: E402
from train import train_lora  # noqa: E402
from train.backbones.backbone import sample_latent  # noqa: E402
from train.backbones.tiny import TinyBackbone  # noqa: E402
from train.dataset import check_dataset, load_pair  # noqa: E402
from train.latent_cache import cached_prompts, encode_pairs  # noqa: E402
from train.metrics import psnr, ssim  # noqa: E402
from train.sampling import sample_images  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = ROOT / "demo" / "weights"
DATA_SEED = 0  # the pretraining scenes use another seed (pretrain_demo.PRETRAIN_SEED)


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def check_weights(folder: Path) -> None:
    """Verify demo/weights against its SHA256SUMS, with a clear message when files are missing or damaged."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise SystemExit(f"error: {sums} is missing; the demo needs the committed miniature weights "
                         "(or run: python demo/pretrain_demo.py --out demo/weights)")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = folder / name
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing (listed in {sums})")
        if file_sha256(path) != digest:
            raise SystemExit(f"error: {path} does not match its sha256 in {sums} (damaged, or a git-lfs pointer?)")


@torch.no_grad()
def evaluate(backbone: TinyBackbone, adapters: dict[str, CtrLoRAAdapter], data_dir: Path, sample_steps: int,
             cfg: float, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, list[str]]:
    """Sample every held-out pair once per adapter, from the same noise and condition latents.

    Returns (samples per adapter name, conditions, targets, names); images [B, 3, H, W] in [0, 1].
    """
    pairs, _ = check_dataset(data_dir)
    latents = encode_pairs(backbone, pairs, show_progress=False)
    hints = sample_latent(latents.cond_moments, backbone.latent_scale, torch.Generator().manual_seed(seed))
    prompts, _ = cached_prompts(backbone, [p.prompt for p in pairs], None, backbone.identity)
    context = prompts.embeddings[[prompts.index(p.prompt) for p in pairs]]
    samples = {}
    for name, adapter in adapters.items():
        started = time.time()
        samples[name] = sample_images(backbone, adapter, hints, context, prompts.embeddings[:1], sample_steps, cfg,
                                      seed)
        log(f"sampled {len(pairs)} held-out pairs with the {name} LoRA ({time.time() - started:.0f} s)")
    images = [load_pair(p) for p in pairs]
    conditions = torch.stack([c for c, _ in images])
    targets = torch.stack([(t + 1.0) / 2.0 for _, t in images])
    return samples, conditions, targets, [p.name for p in pairs]


def metrics(samples: torch.Tensor, targets: torch.Tensor) -> dict[str, list[float]]:
    """Per-image MSE, PSNR (dB) and SSIM of samples against targets (all in [0, 1])."""
    mse = (samples - targets).pow(2).flatten(1).mean(1)
    return {"mse": mse.tolist(), "psnr": psnr(samples, targets).tolist(), "ssim": ssim(samples, targets).tolist()}


def save_preview(path: Path, columns: dict[str, torch.Tensor], rows: int, zoom: int = 3) -> None:
    """A labelled grid: one column per entry of `columns`, one row per held-out pair."""
    blocks = [tensor_to_image(images[:rows], layout="BCHW") for images in columns.values()]
    _, h, w, _ = blocks[0].shape
    header = 14
    grid = Image.new("RGB", (len(blocks) * w * zoom, header + rows * h * zoom), "white")
    draw = ImageDraw.Draw(grid)
    for col, (label, block) in enumerate(zip(columns, blocks)):
        draw.text((col * w * zoom + 4, 2), label, fill="black")
        for row in range(rows):
            tile = Image.fromarray(block[row]).resize((w * zoom, h * zoom), Image.NEAREST)
            grid.paste(tile, (col * w * zoom, header + row * h * zoom))
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def write_report(out: Path, report: dict) -> None:
    """report.json (everything) and report.md (the summary a person reads)."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    mean = report["mean"]
    rows = "\n".join(
        f"| {label} | {mean[key]['mse']:.4f} | {mean[key]['psnr']:.2f} | {mean[key]['ssim']:.3f} |"
        for key, label in (("trained", "trained LoRA"), ("untrained", "untrained LoRA (= Base ControlNet alone)"),
                           ("reconstruction", "autoencoder reconstruction of the target (ceiling)")))
    s = report["settings"]
    t = report["timings_s"]
    gain = mean["trained"]["psnr"] - mean["untrained"]["psnr"]
    text = f"""# CtrLoRA demo report (miniature models)

A LoRA for a condition the Base ControlNet has never seen (a dental lighting map blended with a
per-tooth segmentation map) was trained on {s['train_pairs']} synthetic pairs for {s['steps']} steps
(batch {s['batch_size']}, rank {s['rank']}, lr {s['lr']}). Each of the {s['heldout_pairs']} held-out
pairs was then sampled ({s['sample_steps']} DDIM steps, CFG {s['cfg']}) with the trained LoRA and with
an untrained one (a fresh LoRA computes exactly the Base ControlNet), from the same noise.
Errors are measured between each sample and the pair's target render (images in [0, 1]).

| held-out samples vs targets | MSE (lower is better) | PSNR dB (higher) | SSIM (higher) |
|---|---|---|---|
{rows}

Trained minus untrained: {gain:+.2f} dB PSNR; the trained LoRA is closer to the target on
{report['trained_better_count']} of {s['heldout_pairs']} held-out pairs (MSE).

Time: dataset {t['dataset']:.0f} s, training {t['training']:.0f} s, evaluation {t['evaluation']:.0f} s,
total {t['total']:.0f} s on {report['machine']['threads']} CPU thread(s) ({report['machine']['device']}).

Files: `lora.safetensors` (the trained LoRA, official layout), `preview.png`
(condition | untrained | trained | target), `samples/`, `data/`, `log.jsonl` (training loss).
Everything here is miniature (64 px images, ~{report['model_params_m']:.1f}M-parameter models): it shows that
the training code learns a new control, not what SD1.5 + the official base produce (README, section "Demo").
"""
    (out / "report.md").write_text(text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train and evaluate a CtrLoRA LoRA on miniature models.")
    parser.add_argument("--out", default="demo_out", help="output folder (replaced)")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="miniature weights folder")
    parser.add_argument("--train-count", type=int, default=300, help="training pairs to generate")
    parser.add_argument("--heldout-count", type=int, default=24, help="held-out pairs to evaluate")
    parser.add_argument("--size", type=int, default=64, help="image size (multiple of 32)")
    parser.add_argument("--steps", type=int, default=600, help="LoRA training steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the evaluation samples")
    parser.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance of the evaluation samples")
    parser.add_argument("--preview-rows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    began = time.time()
    timings = {}
    out, weights = Path(args.out), Path(args.weights)
    check_weights(weights)
    if out.exists():
        shutil.rmtree(out)
    data = out / "data"

    log(f"1/4 generating {args.train_count} training + {args.heldout_count} held-out pairs at {args.size} px")
    synth_dental.write_dataset(data / "train", args.train_count, DATA_SEED, args.size)
    synth_dental.write_dataset(data / "heldout", args.heldout_count, DATA_SEED, args.size, start=args.train_count)
    timings["dataset"] = time.time() - began

    log(f"2/4 training a rank-{args.rank} LoRA for {args.steps} steps with train/train_lora.py")
    started = time.time()
    summary = train_lora.main([
        "--data", str(data / "train"), "--model", str(weights), "--out", str(out), "--condition", "dental_lighting_seg",
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--rank", str(args.rank),
        "--lr", str(args.lr), "--seed", str(args.seed), "--cache-dir", "none",
        "--val-every", "0", "--save-every", "0", "--log-every", "50",
    ])
    (out / train_lora.STATE_FILE).unlink(missing_ok=True)  # resume state: not needed after a finished demo run
    timings["training"] = time.time() - started

    log("3/4 sampling the held-out pairs with the trained and an untrained LoRA")
    started = time.time()
    backbone = TinyBackbone.load(weights)
    trained = load_adapter(out / train_lora.LORA_FILE, backbone.controlnet)
    untrained = CtrLoRAAdapter.fresh(backbone.controlnet, args.rank, torch.Generator().manual_seed(args.seed))
    samples, conditions, targets, names = evaluate(
        backbone, {"trained": trained, "untrained": untrained}, data / "heldout", args.sample_steps, args.cfg,
        args.seed)
    target_means = backbone.encode_moments(targets * 2 - 1).chunk(2, dim=1)[0]
    reconstruction = ((backbone.decode(target_means * backbone.latent_scale) + 1) / 2).clamp(0, 1)
    timings["evaluation"] = time.time() - started

    log("4/4 writing preview.png and the report")
    for key, images in samples.items():
        (out / "samples" / key).mkdir(parents=True, exist_ok=True)
        for name, pixels in zip(names, tensor_to_image(images, layout="BCHW")):
            Image.fromarray(pixels).save(out / "samples" / key / name)
    save_preview(out / "preview.png", {"condition": conditions, "untrained": samples["untrained"],
                                       "trained": samples["trained"], "target": targets},
                 min(args.preview_rows, len(names)))
    per_image = {key: metrics(images, targets) for key, images in
                 {**samples, "reconstruction": reconstruction}.items()}
    timings["total"] = time.time() - began
    report = {
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "weights")},
                     "train_pairs": args.train_count, "heldout_pairs": len(names)},
        "mean": {key: {m: float(np.mean(v)) for m, v in values.items()} for key, values in per_image.items()},
        "per_image": {"names": names, **per_image},
        "trained_better_count": int(sum(a < b for a, b in zip(per_image["trained"]["mse"],
                                                               per_image["untrained"]["mse"]))),
        "final_training_loss": summary["loss"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "weights_sha256": {"base": file_sha256(weights / "base.safetensors")},
        "model_params_m": sum(p.numel() for m in (backbone.unet, backbone.autoencoder, backbone.text_encoder,
                                                  backbone.controlnet) for p in m.parameters()) / 1e6,
        "machine": {"threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__},
    }
    write_report(out, report)
    mean = report["mean"]
    log(f"held-out PSNR: trained {mean['trained']['psnr']:.2f} dB vs untrained {mean['untrained']['psnr']:.2f} dB "
        f"(MSE {mean['trained']['mse']:.4f} vs {mean['untrained']['mse']:.4f}); total {timings['total']:.0f} s")
    log(f"see {out / 'report.md'} and {out / 'preview.png'}")
    return report


if __name__ == "__main__":
    main()
