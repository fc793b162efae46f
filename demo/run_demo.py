"""The bundled demo (`make demo`): the dental recipe, trained and evaluated on a CPU in minutes.

No Stable Diffusion weights can ship with this repository, so the demo runs the real code on a
miniature configuration (see the README section "Demo") and follows the first user's recipe:

1. write a procedural dental dataset in the maps layout (`synth_dental.write_maps_dataset`):
   grey lighting maps in lighting/, flat-colour segmentation maps (teeth, gums, dark grey
   background) in segmentation/ and renders in target/, under names shaped like the user's
   (`upper_3C6EF372_front_top_left.png`); a training set and a held-out set;
2. train one LoRA with the real trainer (`train_lora.main`): the segmentation blended into the
   lighting map at 30 % opacity (`--maps lighting,segmentation --blend-alpha 0.3`, exactly the
   Blend Lighting + Segmentation node's blend) and the tooth-weighted loss
   (`--region-weights teeth=5,gum=1`), on the miniature pretrained models in demo/weights (made
   by `pretrain_demo.py`), whose Base ControlNet has never seen this condition;
3. evaluate with the real evaluator (`evaluate.main`) on the held-out set: the trained LoRA vs
   the untrained base alone vs no control, from the same noise, with the dental metrics (SSIM,
   PSNR, boundary F1, teeth-region PSNR, high-frequency energy ratio).

Writes to --out: lora.safetensors, preview.png (condition | untrained | trained | target),
report.md and report.json, eval/ (the evaluator's metrics, grids and samples), data/ and the
trainer's log.jsonl.

    python demo/run_demo.py --out demo_out
"""
from __future__ import annotations

import argparse
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

from ctrlora_core.files import atomic_write, file_sha256, write_json  # noqa: E402
from demo import synth_dental  # noqa: E402
from demo.pretrain_demo import PRETRAIN_SEED  # noqa: E402
from train import evaluate, train_lora  # noqa: E402
from train.backbones.tiny import TinyBackbone  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = ROOT / "demo" / "weights"
# Gains over the untrained base that make the learned control unmistakable (either one suffices).
TARGET_GAINS = {"teeth_psnr": 3.0, "boundary_f1": 0.1}


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


def model_params_m(weights: Path) -> float:
    """Parameters of the miniature models (UNet, autoencoder, text encoder, Base ControlNet), in millions."""
    backbone = TinyBackbone.load(weights)
    models = (backbone.unet, backbone.autoencoder, backbone.text_encoder, backbone.controlnet)
    return sum(p.numel() for m in models for p in m.parameters()) / 1e6


def save_preview(path: Path, columns: dict[str, list[Path]], zoom: int = 3) -> None:
    """A labelled grid of image files: one column per entry of `columns`, one row per held-out pair."""
    blocks = {label: [np.asarray(Image.open(f).convert("RGB")) for f in files] for label, files in columns.items()}
    h, w, _ = next(iter(blocks.values()))[0].shape
    rows = len(next(iter(blocks.values())))
    header = 14
    grid = Image.new("RGB", (len(blocks) * w * zoom, header + rows * h * zoom), "white")
    draw = ImageDraw.Draw(grid)
    for col, (label, images) in enumerate(blocks.items()):
        draw.text((col * w * zoom + 4, 2), label, fill="black")
        for row, pixels in enumerate(images):
            tile = Image.fromarray(pixels).resize((w * zoom, h * zoom), Image.NEAREST)
            grid.paste(tile, (col * w * zoom, header + row * h * zoom))
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def write_report(out: Path, report: dict) -> str:
    """report.json (everything) and report.md (the summary a person reads); returns the metrics table."""
    write_json(out / "report.json", report)
    s, t, ev = report["settings"], report["timings_s"], report["evaluation"]
    table = evaluate.markdown_table(ev["mean"], ev["target_boundary_f1"])
    gains = report["gains_over_untrained"]
    met = " and ".join(f"{evaluate.COLUMNS[k]} {gains[k]:+.2f} (target {v:+g})" for k, v in TARGET_GAINS.items())
    text = f"""# CtrLoRA demo report (miniature models)

A LoRA for a condition the Base ControlNet has never seen (a grey dental lighting map with the flat-colour
segmentation map blended in at {s['blend_alpha']:g} opacity, as the Blend Lighting + Segmentation node does) was
trained with the tooth-weighted loss ({s['region_weights']}) on {s['train_count']} synthetic pairs for
{s['steps']} steps (batch {s['batch_size']}, rank {s['rank']}, lr {s['lr']:g}; data seed {s['data_seed']},
training seed {s['seed']}). Each of the {ev['pairs']} held-out pairs was then sampled ({s['sample_steps']} DDIM
steps, CFG {s['cfg']:g}) with the trained LoRA, with the base alone (an untrained LoRA computes exactly the Base
ControlNet) and without control, from the same noise, and compared with its target render
(`train/evaluate.py`; boundary F1 with a {ev['settings']['boundary_tolerance_px']}-pixel tolerance).

{table}
Trained minus untrained: {met}; target met: {'yes' if report['target_met'] else 'NO'}. The trained
LoRA's teeth are closer to the target (teeth PSNR) than the base's on {report['pairs_with_better_teeth_psnr']}
of {ev['pairs']} held-out pairs.

Time: dataset {t['dataset']:.0f} s, training {t['training']:.0f} s, evaluation {t['evaluation']:.0f} s,
total {t['total']:.0f} s on {report['machine']['threads']} CPU thread(s) ({report['machine']['device']}).

Files: `lora.safetensors` (the trained LoRA, official layout), `preview.png`
(condition | untrained | trained | target), `eval/` (metrics.json, metrics.md, grids, samples/), `data/`,
`log.jsonl` (training loss). Everything here is miniature ({s['size']} px images, ~{report['model_params_m']:.1f}M-
parameter models): it shows that the training code learns a new control, not what SD1.5 + the official base
produce (README, section "Demo").
"""
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text))
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train and evaluate a dental CtrLoRA LoRA on miniature models.")
    parser.add_argument("--out", default="demo_out", help="output folder (replaced)")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="miniature weights folder")
    parser.add_argument("--train-count", type=int, default=300, help="training pairs to generate")
    parser.add_argument("--heldout-count", type=int, default=24, help="held-out pairs to evaluate")
    parser.add_argument("--size", type=int, default=64, help="image size (multiple of 32; the weights know 64)")
    parser.add_argument("--data-seed", type=int, default=0,
                        help=f"seed of the synthetic scenes (not {PRETRAIN_SEED}: the pretraining scenes)")
    parser.add_argument("--steps", type=int, default=300, help="LoRA training steps")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    parser.add_argument("--blend-alpha", type=float, default=0.3, help="opacity of the segmentation over lighting")
    parser.add_argument("--region-weights", default="teeth=5,gum=1", help="tooth-weighted loss ('' = plain MSE)")
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of the evaluation samples")
    parser.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance of the evaluation samples")
    parser.add_argument("--preview-rows", type=int, default=8, help="held-out pairs shown in preview.png")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and evaluation sampling")
    args = parser.parse_args(argv)
    if args.data_seed == PRETRAIN_SEED:
        parser.error(f"--data-seed {PRETRAIN_SEED} draws the scenes the miniature base was pretrained on")
    began = time.time()
    timings = {}
    out, weights = Path(args.out), Path(args.weights)
    check_weights(weights)
    if out.exists():
        shutil.rmtree(out)
    train_dir, heldout_dir = out / "data" / "train", out / "data" / "heldout"

    log(f"1/4 writing {args.train_count} training + {args.heldout_count} held-out pairs at {args.size} px "
        "(maps layout: lighting/, segmentation/, target/)")
    synth_dental.write_maps_dataset(train_dir, args.train_count, args.data_seed, args.size)
    keys = synth_dental.write_maps_dataset(heldout_dir, args.heldout_count, args.data_seed, args.size,
                                           start=args.train_count)
    timings["dataset"] = time.time() - began

    log(f"2/4 training a rank-{args.rank} LoRA for {args.steps} steps with train/train_lora.py")
    started = time.time()
    summary = train_lora.main([
        "--data", str(train_dir), "--maps", "lighting,segmentation", "--blend-alpha", str(args.blend_alpha),
        "--region-weights", args.region_weights, "--model", str(weights), "--out", str(out),
        "--condition", "dental_lighting_seg", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--rank", str(args.rank), "--lr", str(args.lr), "--seed", str(args.seed), "--cache-dir", "none",
        "--val-count", "0", "--val-every", "0", "--save-every", "0", "--log-every", "50",
    ])
    (out / train_lora.STATE_FILE).unlink(missing_ok=True)  # resume state: not needed after a finished demo run
    timings["training"] = time.time() - started

    log("3/4 evaluating on the held-out pairs with train/evaluate.py: trained vs untrained vs no control")
    started = time.time()
    evaluation = evaluate.main([
        "--data", str(heldout_dir), "--lora", str(out / train_lora.LORA_FILE), "--model", str(weights),
        "--steps", str(args.sample_steps), "--cfg", str(args.cfg), "--seed", str(args.seed), "--batch-size", "8",
        "--save-samples", "--out", str(out / "eval"),
    ])
    timings["evaluation"] = time.time() - started

    log("4/4 writing preview.png and the report")
    shown = [key.name for key in keys[:args.preview_rows]]
    samples = out / "eval" / "samples"
    save_preview(out / "preview.png", {
        "condition": [samples / "condition" / n for n in shown], "untrained": [samples / "untrained" / n for n in shown],
        "trained": [samples / "trained" / n for n in shown], "target": [heldout_dir / "target" / n for n in shown]})
    mean = evaluation["mean"]
    gains = {k: mean["trained"][k] - mean["untrained"][k] for k in ("ssim", "psnr", "boundary_f1", "teeth_psnr")}
    per_pair = evaluation["per_pair"]
    teeth_better = sum(t["teeth_psnr"] is not None and t["teeth_psnr"] > u["teeth_psnr"]
                       for t, u in zip(per_pair["trained"], per_pair["untrained"]))
    timings["total"] = time.time() - began
    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "weights")},
        "evaluation": evaluation,
        "gains_over_untrained": gains,
        "target_gains": TARGET_GAINS,
        "target_met": any(gains[k] >= v for k, v in TARGET_GAINS.items()),
        "pairs_with_better_teeth_psnr": teeth_better,
        "final_training_loss": summary["loss"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "weights_sha256": {"base": file_sha256(weights / "base.safetensors")},
        "model_params_m": model_params_m(weights),
        "machine": {"threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__},
    }
    table = write_report(out, report)
    print(f"\nheld-out dental metrics ({evaluation['pairs']} pairs, {args.sample_steps} DDIM steps, CFG {args.cfg:g}):\n"
          f"\n{table}\nteeth PSNR {gains['teeth_psnr']:+.2f} dB, boundary F1 {gains['boundary_f1']:+.3f} over the "
          f"untrained base; total {timings['total']:.0f} s. See {out / 'report.md'} and {out / 'preview.png'}",
          flush=True)
    return report


if __name__ == "__main__":
    main()
