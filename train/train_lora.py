"""Train a CtrLoRA condition LoRA from (condition image, target image, prompt) pairs.

    python train/train_lora.py --data DATA --model sd15.safetensors --base ctrlora_sd15_basecn700k.ckpt --out runs/x
    torchrun --nproc_per_node 4 train/train_lora.py --config my_run.yaml          # several GPUs / nodes

The official fine-tuning recipe (spec §5): LoRA rank 128 on every Linear of the frozen Base
ControlNet + the condition's own zero convs and attention norms (37M trainable parameters at
SD1.5), SD frozen, AdamW lr 1e-5, the prompt replaced by "" 30% of the time, epsilon-prediction
MSE with t uniform in [0, 1000). Dental data may come as separate lighting and segmentation maps
(--maps, blended exactly as the Blend Lighting + Segmentation node does) and train with the
tooth-weighted loss (--region-weights teeth=5). Faster than the official code, same maths: every image and
prompt is encoded once and cached (posterior moments, so each step still draws a fresh latent
sample), bf16 autocast on GPUs, SDPA attention, optional gradient checkpointing and torch.compile.

The file reads top to bottom: options, helpers, then `main` (setup, data, caches, parameters,
resume, training loop with checkpoints and validation). Every option is a command-line flag and
may also come from a YAML/TOML file given with --config (flags win).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

try:  # installed by name (`pip install -e .`); a clear message instead of a bare ModuleNotFoundError
    import ctrlora_core  # noqa: F401
except ModuleNotFoundError:
    sys.exit("error: the pack is not installed in this Python; run once: "
             "python -m pip install --no-deps -e <the pack's folder>   (README: Trainer > Install)")

from ctrlora_core.adapters import CtrLoRAAdapter, stack_adapters
from ctrlora_core.conditions import BLEND_MODES, DENTAL_BLEND_ALPHA, SEG_TOLERANCE
from ctrlora_core.errors import CtrLoRAError
from ctrlora_core.files import atomic_write, file_sha256
from ctrlora_core.formats import save_adapter
from ctrlora_core.prompts import DEFAULT_TEMPLATE, PromptTemplate
from ctrlora_core.schedule import NoiseSchedule
from train import distributed
from train.backbones import open_backbone
from train.backbones.backbone import Backbone, sample_latent
from train.dataset import SEGMENTATION, MapBlend, Pair, check_dataset, image_size, load_pair
from train.devices import pick_device, resolve_precision
from train.latent_cache import LatentSet, cached_latents, cached_prompts, segmentation_file
from train.metrics import psnr, ssim
from train.regions import RegionWeights, missing_region_warnings, parse_palette, weight_map, weighted_mse
from train.sampling import sample_images, save_grid


# ----------------------------------------------------------------------------------------------
# Options (defaults = the official recipe's maths with our speed-ups)

def _opt(default, help: str):  # noqa: A002
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data
    data: str = _opt("", "dataset folder: official layout (prompt.json + source/ + target/), dental layout "
                         "(source/ + target/ with matching file names; prompts from file names or <name>.txt), "
                         "or with --maps the maps layout (lighting/ + segmentation/ + target/, or one folder of "
                         "lighting_<key>.png, seg_<key>.png and <key>.png)")
    maps: str = _opt("", "maps layout: the maps blended into the condition, in blend order (first = base layer), "
                         "e.g. 'lighting,segmentation' ('seg' = 'segmentation'); empty = a ready-made condition "
                         "(official or dental layout)")
    blend_alpha: float = _opt(DENTAL_BLEND_ALPHA, "maps layout: alpha of the blend, as the Blend Lighting + "
                                                  "Segmentation node's alpha (default: 0.3 = the segmentation at "
                                                  "30 percent opacity, the dental recipe)")
    blend_mode: str = _opt("alpha", f"maps layout: blend mode, as the node's mode ({', '.join(BLEND_MODES)})")
    val_data: str = _opt("", "held-out dataset folder for validation (default: hold out --val-count pairs of --data)")
    val_count: int = _opt(4, "pairs held out of --data for validation when --val-data is not given (0 = none)")
    prompt_template: str = _opt(DEFAULT_TEMPLATE, "dental and maps layouts: prompt made from file names with a jaw "
                                                  "word and a view word ('lighting_upper_AB12_front_top_left.png'); "
                                                  "placeholders {jaw}, {view} and {view_detail}")
    skip_bad: bool = _opt(False, "skip invalid pairs (still listed) instead of stopping")
    condition: str = _opt("", "condition name stored in the LoRA metadata (default: the --data folder name)")
    # models
    model: str = _opt("", "SD1.5-family checkpoint (.safetensors/.ckpt, loaded through ComfyUI), or a folder of "
                          "miniature demo weights (tiny_config.json), or 'tiny-random[:SEED]' (tests/benchmarks)")
    base: str = _opt("", "CtrLoRA Base ControlNet file (official .ckpt or .safetensors); optional for a tiny folder")
    comfyui: str = _opt("", "ComfyUI folder used to load the SD checkpoint (default: $COMFYUI_PATH, else the "
                            "ComfyUI this pack is installed in)")
    # LoRA and optimisation
    rank: int = _opt(128, "LoRA rank (official: 128)")
    lr: float = _opt(1e-5, "AdamW learning rate, the peak of --lr-schedule (official: 1e-5)")
    lr_schedule: str = _opt("constant", "learning rate over the steps: constant (official) or cosine (from --lr down "
                                        "to 0 at --steps, which suits short runs at a high lr)")
    lr_warmup: int = _opt(0, "steps of linear warm-up from 0 to --lr before the schedule")
    weight_decay: float = _opt(0.01, "AdamW weight decay (official: torch default 0.01)")
    adam_eps: float = _opt(1e-8, "AdamW epsilon (official: torch default 1e-8)")
    steps: int = _opt(1000, "optimizer steps in total (official novel-condition LoRAs: 1000 for 1000 pairs)")
    batch_size: int = _opt(1, "pairs per process per micro-step")
    grad_accum: int = _opt(1, "micro-steps per optimizer step; global batch = batch-size x grad-accum x processes")
    prompt_dropout: float = _opt(0.3, "probability of training a pair with the empty prompt (official: 0.3)")
    region_weights: str = _opt("", "tooth-weighted loss: weights of segmentation regions, e.g. 'teeth=5,gum=1' "
                                   "(per latent position W = 1 + sum M_region * (weight - 1), loss = mean(W * "
                                   "(eps - eps_hat)^2); needs --maps with segmentation); empty = plain MSE")
    seg_palette: str = _opt("", "segmentation colours replacing or adding to the dental palette teeth=#C4C474,"
                                "gum=#CC442C,background=#383838, e.g. 'teeth=#C8C878'")
    seg_tolerance: float = _opt(SEG_TOLERANCE, "largest distance of a segmentation pixel from its region's colour "
                                               "(Euclidean, 8-bit RGB units, 0-441; default: 40)")
    seed: int = _opt(0, "seed of the adapter init, data order, noise and timesteps")
    # speed and memory
    device: str = _opt("auto", "auto (CUDA when available, one GPU per torchrun process), cpu, cuda, cuda:N, mps")
    precision: str = _opt("auto", "auto (bf16 on CUDA, else fp32), bf16 (autocast), fp16 (autocast + grad "
                                  "scaler), fp32")
    gradient_checkpointing: bool = _opt(False, "recompute ControlNet and UNet blocks in backward "
                                               "(less memory, slower steps)")
    compile: bool = _opt(False, "torch.compile the UNet (the first steps are slow while it compiles)")
    cache_dir: str = _opt("", "folder of the VAE/text caches (default: OUT/cache; 'none' = keep them in memory only)")
    encode_batch_size: int = _opt(8, "images per VAE call while building the cache")
    # outputs
    out: str = _opt("runs/ctrlora", "output folder: LoRA, training state, log.jsonl, validation grids")
    save_every: int = _opt(250, "write the LoRA and the training state every N steps (and at the end; 0 = end only)")
    val_every: int = _opt(250, "validate every N steps, before training and at the end (0 = never)")
    val_steps: int = _opt(20, "DDIM steps of validation samples (official inference: 20)")
    val_cfg: float = _opt(7.5, "classifier-free guidance scale of validation samples (official: 7.5)")
    log_every: int = _opt(10, "log the mean loss every N steps (log.jsonl and the progress bar)")
    resume: bool = _opt(False, "continue from OUT/train_state.pt (optimizer, step and RNG states included)")


LR_SCHEDULES = ("constant", "cosine")
LORA_FILE = "lora.safetensors"
STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"
# Options that must not change when a run is resumed (the others may, e.g. --steps, except under a
# decaying --lr-schedule, whose curve ends at --steps).
RESUME_FIXED = ("data", "model", "base", "rank", "batch_size", "grad_accum", "seed", "prompt_dropout",
                "prompt_template", "val_data", "val_count", "maps", "blend_alpha", "blend_mode", "region_weights",
                "seg_palette", "seg_tolerance", "lr_schedule", "lr_warmup")


def _field_type(f) -> type:
    return {"bool": bool, "int": int, "float": float, "str": str}[str(f.type)]


def _coerce(name: str, value, kind: type):
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"option {name!r}: expected true or false, got {value!r}")
        return value
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {name!r}: expected {kind.__name__}, got {value!r}") from None


def read_config_file(path: str) -> dict:
    """Options from a YAML (.yaml/.yml) or TOML (.toml) file; keys are option names ('-' or '_')."""
    suffix = Path(path).suffix.lower()
    text = Path(path).read_text(encoding="utf-8")
    if suffix in (".yaml", ".yml"):
        values = yaml.safe_load(text) or {}
    elif suffix == ".toml":
        import tomllib

        values = tomllib.loads(text)
    else:
        raise ValueError(f"{path}: config file must end in .yaml, .yml or .toml")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    known = {f.name: f for f in fields(TrainConfig)}
    result = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"{path}: unknown option {key!r} (see --help)")
        result[name] = _coerce(name, value, _field_type(known[name]))
    return result


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the --config file, then command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or TOML file with any of the options below (flags override it)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        text = f.metadata["help"]
        if "default:" not in text:
            text += f" (default: {f.default!r})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    values = read_config_file(config_file) if config_file else {}
    values.update(args)
    config = TrainConfig(**values)
    problems = [msg for ok, msg in (
        (config.data, "--data is required"),
        (config.model, "--model is required"),
        (config.rank >= 1, "--rank must be >= 1"),
        (config.steps >= 1, "--steps must be >= 1"),
        (config.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}"),
        (0 <= config.lr_warmup < config.steps, "--lr-warmup must be >= 0 and less than --steps"),
        (config.batch_size >= 1 and config.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
        (0.0 <= config.prompt_dropout <= 1.0, "--prompt-dropout must be in [0, 1]"),
        (config.precision in ("auto", "bf16", "fp16", "fp32"), "--precision must be auto, bf16, fp16 or fp32"),
        (config.val_count >= 0 and config.val_every >= 0 and config.save_every >= 0, "counts must be >= 0"),
    ) if not ok]
    try:
        map_blend(config)
        region_weights(config)
    except CtrLoRAError as err:
        problems.append(str(err))
    if problems:
        parser.error("; ".join(problems))
    return config


def map_blend(config: TrainConfig) -> MapBlend | None:
    """The maps layout's blend from --maps, --blend-alpha, --blend-mode (None without --maps)."""
    if not config.maps.strip():
        return None
    background = parse_palette(config.seg_palette)["background"]
    return MapBlend.parse(config.maps, config.blend_alpha, config.blend_mode, background)


def region_weights(config: TrainConfig) -> RegionWeights | None:
    """The region-weighted loss from --region-weights, --seg-palette, --seg-tolerance (None = plain MSE)."""
    if not config.region_weights.strip():
        return None
    blend = map_blend(config)
    if blend is None or SEGMENTATION not in blend.maps:
        raise CtrLoRAError("--region-weights needs the maps layout with a segmentation map "
                           "(e.g. --maps lighting,segmentation)")
    return RegionWeights.parse(config.region_weights, config.seg_palette, config.seg_tolerance)


# ----------------------------------------------------------------------------------------------
# Helpers

def learning_rate(config: TrainConfig, step: int) -> float:
    """The lr of optimizer step `step` (0-based). A function of the step alone, so a resumed run
    continues the same curve without a scheduler state."""
    if step < config.lr_warmup:
        return config.lr * (step + 1) / config.lr_warmup
    if config.lr_schedule == "cosine":
        progress = (step - config.lr_warmup) / (config.steps - config.lr_warmup)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr


def _param_name(key: str) -> str:
    return key.replace(".", "/")


class AdapterModule(nn.Module):
    """The adapter's tensors as trainable Parameters + the forward pass through frozen base and UNet.

    Each forward builds an AdapterStack from the Parameters (gradients flow through the
    stacking), runs the Base ControlNet with it and feeds the residuals to the UNet.
    """

    def __init__(self, adapter: CtrLoRAAdapter, backbone: Backbone, gradient_checkpointing: bool = False):
        super().__init__()
        self.keys = sorted(adapter.tensors)
        self.params = nn.ParameterDict({_param_name(k): nn.Parameter(adapter.tensors[k].detach().float().clone())
                                        for k in self.keys})
        self.backbone = backbone  # a plain attribute: the frozen models are not part of this module
        self.gradient_checkpointing = gradient_checkpointing

    def adapter(self) -> CtrLoRAAdapter:
        """The current adapter (tensors are the Parameters themselves)."""
        return CtrLoRAAdapter({k: self.params[_param_name(k)] for k in self.keys})

    def snapshot(self) -> CtrLoRAAdapter:
        """A detached CPU copy of the current adapter."""
        return CtrLoRAAdapter({k: self.params[_param_name(k)].detach().float().cpu().clone() for k in self.keys})

    def forward(self, hint: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        stack = stack_adapters([self.adapter()])
        control = self.backbone.controlnet(hint, t, context, adapters=stack,
                                           gradient_checkpointing=self.gradient_checkpointing)
        return self.backbone.predict_noise(x_t, t, context, control)


@dataclass
class Batch:
    hint: torch.Tensor  # condition latents [B, 4, h, w]
    x_t: torch.Tensor  # noisy target latents
    t: torch.Tensor  # timesteps [B] int64
    noise: torch.Tensor  # the eps target
    context: torch.Tensor  # text embeddings [B, L, D]
    weight: torch.Tensor | None = None  # region-weighted loss: W [B, 1, h, w] (None = plain MSE)


def slot_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The random stream of one sample slot (epoch, position in the epoch's order).

    Randomness is tied to the slot, not to a process, so any number of processes, any
    micro-batching and any resume point draw exactly the same numbers for the same sample.
    """
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_000_007 + position) % (2**63))


def make_batch(cond_moments: torch.Tensor, target_moments: torch.Tensor, prompt_ids: list[int],
               prompt_table: torch.Tensor, generators: list[torch.Generator], scale: float,
               schedule: NoiseSchedule, prompt_dropout: float, device: torch.device) -> Batch:
    """Draw timestep, prompt dropout, posterior samples and noise per sample (CPU), then move to `device`.

    prompt_table row 0 must be the empty prompt.
    """
    ts, ids, x0s, hints, noises = [], [], [], [], []
    for b, g in enumerate(generators):
        ts.append(int(torch.randint(0, schedule.num_timesteps, (1,), generator=g)))
        dropped = float(torch.rand(1, generator=g)) < prompt_dropout
        ids.append(0 if dropped else prompt_ids[b])
        x0s.append(sample_latent(target_moments[b:b + 1].float().cpu(), scale, g))
        hints.append(sample_latent(cond_moments[b:b + 1].float().cpu(), scale, g))
        noises.append(torch.randn(x0s[-1].shape, generator=g))
    t = torch.tensor(ts, dtype=torch.int64)
    x0, noise = torch.cat(x0s), torch.cat(noises)
    x_t = schedule.q_sample(x0, t, noise)
    return Batch(torch.cat(hints).to(device), x_t.to(device), t.to(device), schedule.eps_target(noise).to(device),
                 prompt_table[ids].to(device))


def loss_on(model: nn.Module, batch: Batch, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Epsilon-prediction MSE of one micro-batch, weighted by batch.weight when it has one."""
    with torch.autocast(batch.x_t.device.type, autocast_dtype, enabled=autocast_dtype is not None):
        eps = model(batch.hint, batch.x_t, batch.t, batch.context)
    if batch.weight is None:
        return F.mse_loss(eps.float(), batch.noise.float())
    return weighted_mse(eps.float(), batch.noise.float(), batch.weight)


def rng_states() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": json.dumps(random.getstate()),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = json.loads(states["python"])
    random.setstate((version, tuple(internal), gauss))


@dataclass
class ValidationSet:
    """The fixed held-out inputs of every validation."""

    hints: torch.Tensor  # fixed condition latents
    context: torch.Tensor
    uncond: torch.Tensor
    conditions: torch.Tensor  # [B, 3, H, W] in [0, 1]
    targets: torch.Tensor  # [B, 3, H, W] in [0, 1]


def validate(backbone: Backbone, adapter: CtrLoRAAdapter, val: ValidationSet, config: TrainConfig,
             autocast_dtype: torch.dtype | None, grid_path: Path) -> dict:
    """Sample the held-out pairs, write the grid PNG, return mean PSNR/SSIM against the targets."""
    samples = sample_images(backbone, adapter, val.hints, val.context, val.uncond, config.val_steps,
                            config.val_cfg, config.seed, autocast_dtype)
    save_grid(grid_path, val.conditions, samples, val.targets)
    return {"val_psnr": float(psnr(samples, val.targets).mean()), "val_ssim": float(ssim(samples, val.targets).mean())}


def split_validation(pairs: list[Pair], config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs): --val-data, or --val-count pairs chosen with the seed."""
    if config.val_data:
        val_pairs, _ = check_dataset(config.val_data, PromptTemplate(config.prompt_template), config.skip_bad,
                                     blend=map_blend(config))
        return pairs, val_pairs[: max(config.val_count, 1)]
    if config.val_count == 0 or config.val_every == 0:
        return pairs, []
    if config.val_count >= len(pairs):
        raise CtrLoRAError(f"--val-count {config.val_count} leaves no training pairs ({len(pairs)} pairs)")
    chosen = set(torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.seed))
                 [: config.val_count].tolist())
    return ([p for i, p in enumerate(pairs) if i not in chosen], [p for i, p in enumerate(pairs) if i in chosen])


# ----------------------------------------------------------------------------------------------
# Training

def main(argv: list[str] | None = None) -> dict:
    """Run the training; returns a summary (paths, steps, last loss)."""
    config = parse_config(argv)

    # -- processes and devices
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(config.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist_info = distributed.setup(device)
    main_process = dist_info.is_main
    autocast_dtype, weight_dtype = resolve_precision(config.precision, device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    out = Path(config.out)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        if main_process:
            tqdm.write(message)

    # -- models
    backbone = open_backbone(config.model, config.base, config.comfyui, device, weight_dtype)
    if config.gradient_checkpointing:
        backbone.set_gradient_checkpointing(True)
    if config.compile:
        backbone.compile_unet()

    # -- data: validate everything before any training
    template = PromptTemplate(config.prompt_template)
    blend, regions = map_blend(config), region_weights(config)
    pairs, issues = check_dataset(config.data, template, config.skip_bad, blend=blend)
    if issues:
        say(f"skipping {len(issues)} problem(s) (--skip-bad):\n" + "\n".join(f"  - {i}" for i in issues))
    train_pairs, val_pairs = split_validation(pairs, config)
    width, height = image_size(train_pairs[0].target)
    if val_pairs and image_size(val_pairs[0].target) != (width, height):
        raise CtrLoRAError(f"--val-data images are {image_size(val_pairs[0].target)}, training images {width}x{height}")
    condition = config.condition or Path(config.data).resolve().name

    # -- caches: local rank 0 encodes (once per content key), the others wait and read
    cache_dir = None if config.cache_dir == "none" else Path(config.cache_dir or out / "cache")
    identity = backbone.identity
    build = dist_info.local_rank == 0
    if cache_dir is None or build:
        latents, built = cached_latents(backbone, train_pairs + val_pairs, (width, height), cache_dir, identity,
                                        build=True, batch_size=config.encode_batch_size, show_progress=main_process,
                                        regions=regions)
        prompts, _ = cached_prompts(backbone, [p.prompt for p in train_pairs + val_pairs], cache_dir, identity)
        say(f"latent cache: {'built' if built else 'reused'} ({len(train_pairs) + len(val_pairs)} pairs, "
            f"{width}x{height})")
    distributed.barrier(dist_info)
    if cache_dir is not None and not build:
        latents, _ = cached_latents(backbone, train_pairs + val_pairs, (width, height), cache_dir, identity,
                                    build=False, regions=regions)
        prompts, _ = cached_prompts(backbone, [p.prompt for p in train_pairs + val_pairs], cache_dir, identity,
                                    build=False)
    backbone.release_encoders()  # from here on only validation decodes (on whatever device the VAE is)
    n_train = len(train_pairs)
    train_latents = LatentSet(latents.cond_moments[:n_train], latents.target_moments[:n_train])
    loss_weights = None
    if regions is not None:
        train_latents.region_masks = latents.region_masks[:n_train]
        loss_weights = regions.weight_tensor()
        seg_files = [str(segmentation_file(p)) for p in train_pairs]
        for line in missing_region_warnings(seg_files, latents.region_pixels[:n_train], regions):
            say(f"warning: {line}")
    prompt_ids = [prompts.index(p.prompt) for p in train_pairs]
    prompt_table = prompts.embeddings.to(device)
    val = None
    if val_pairs and main_process:
        generator = torch.Generator().manual_seed(config.seed)
        images = [load_pair(p) for p in val_pairs]
        val = ValidationSet(
            hints=sample_latent(latents.cond_moments[n_train:], backbone.latent_scale, generator),
            context=prompts.embeddings[[prompts.index(p.prompt) for p in val_pairs]],
            uncond=prompts.embeddings[:1],
            conditions=torch.stack([c for c, _ in images]),
            targets=torch.stack([(t + 1.0) / 2.0 for _, t in images]))

    # -- trainable parameters: a fresh adapter (step 0 computes exactly the Base ControlNet)
    adapter = CtrLoRAAdapter.fresh(backbone.controlnet, config.rank, torch.Generator().manual_seed(config.seed))
    module = AdapterModule(adapter, backbone, config.gradient_checkpointing).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  eps=config.adam_eps)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    n_lora = sum(t.numel() for k, t in adapter.tensors.items() if "lora_layer" in k)
    n_total = sum(t.numel() for t in adapter.tensors.values())
    say(f"trainable: {n_total / 1e6:.2f}M parameters (LoRA {n_lora / 1e6:.2f}M, zero convs + norms "
        f"{(n_total - n_lora) / 1e6:.2f}M); frozen models on {device}, precision "
        f"{autocast_dtype or torch.float32}")

    # -- data order: DistributedSampler, one epoch = the pairs each process can take whole steps of
    sampler = DistributedSampler(range(n_train), num_replicas=dist_info.world_size, rank=dist_info.rank,
                                 shuffle=True, seed=config.seed, drop_last=True)
    per_step = config.batch_size * config.grad_accum  # samples per process per optimizer step
    global_batch = per_step * dist_info.world_size
    steps_per_epoch = len(sampler) // per_step
    if steps_per_epoch == 0:
        raise CtrLoRAError(f"{n_train} training pairs are fewer than the global batch {global_batch}")
    say(f"global batch {global_batch} = batch size {config.batch_size} x grad accum {config.grad_accum} x "
        f"{dist_info.world_size} process(es); {steps_per_epoch} steps per epoch")

    # -- resume
    state_path, lora_path = out / STATE_FILE, out / LORA_FILE
    start_step = 0
    if config.resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        defaults = TrainConfig()  # states of older versions lack the newer options: they had the defaults
        fixed = RESUME_FIXED + (("steps",) if config.lr_schedule != "constant" else ())  # the curve ends at --steps
        changed = [k for k in fixed if state["config"].get(k, getattr(defaults, k)) != getattr(config, k)]
        if state["world_size"] * state["per_step"] != global_batch:
            changed.append("global batch")
        if changed:
            raise CtrLoRAError(f"{state_path}: cannot resume, these options differ from the saved run: {changed}")
        with torch.no_grad():
            for k in module.keys:
                module.params[_param_name(k)].copy_(state["params"][k])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        start_step = int(state["step"])
        say(f"resumed from {state_path} at step {start_step}")
    elif config.resume:
        say(f"--resume: no {state_path} yet, starting from step 0")

    model: nn.Module = module
    if dist_info.enabled:
        model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    base_file = config.base or getattr(backbone.controlnet, "source_path", "")  # tiny-random has no file
    base_sha256 = file_sha256(base_file) if base_file else None
    metadata = {
        "condition": condition,
        "prompt_template": config.prompt_template,
        "base_sha256": base_sha256,
        "resolution": f"{width}x{height}",
        "sd_model": os.path.basename(config.model),
        "pairs": str(n_train),
        "global_batch": str(global_batch),
        "lr": str(config.lr),
        "lr_schedule": config.lr_schedule,
        "lr_warmup": str(config.lr_warmup),
        "prompt_dropout": str(config.prompt_dropout),
        "precision": str(autocast_dtype or torch.float32).replace("torch.", ""),
    }
    if blend is not None:
        metadata.update(maps=",".join(blend.maps), blend_mode=blend.mode, blend_alpha=f"{blend.alpha:g}")
    if regions is not None:
        metadata.update(regions.metadata())

    def save_checkpoint(step: int) -> None:
        """Training state first, then the LoRA: each file is replaced atomically, so a kill at any
        moment leaves the last good files (and a resume from the state file)."""
        state = {
            "step": step, "params": {k: v.detach().cpu() for k, v in module.snapshot().tensors.items()},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_states(),
            "config": {k: getattr(config, k) for k in RESUME_FIXED + ("steps",)}, "world_size": dist_info.world_size,
            "per_step": per_step}
        atomic_write(state_path, lambda tmp: torch.save(state, tmp))
        save_adapter(module.snapshot(), lora_path, {**metadata, "training_steps": step})

    log_file = open(out / LOG_FILE, "a", encoding="utf-8") if main_process else None
    try:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard")) if main_process else None
    except ImportError:
        writer = None

    def log(record: dict) -> None:
        if log_file is None:
            return
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, record["step"])

    def run_validation(step: int) -> None:
        if val is not None:
            metrics = validate(backbone, module.snapshot(), val, config, autocast_dtype,
                               out / "val" / f"step_{step:06d}.png")
            log({"step": step, **metrics})
            say(f"step {step}: validation PSNR {metrics['val_psnr']:.2f} dB, SSIM {metrics['val_ssim']:.4f}")
        distributed.barrier(dist_info)

    # -- training loop
    schedule = NoiseSchedule()
    if config.val_every and start_step == 0:
        run_validation(0)
    progress = tqdm(total=config.steps, initial=start_step, desc="training", unit="step", disable=not main_process,
                    dynamic_ncols=True)
    window_losses: list[torch.Tensor] = []
    window_start = time.perf_counter()
    last_loss = math.nan
    order_epoch, order = -1, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(start_step, config.steps):
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            sampler.set_epoch(epoch)
            order, order_epoch = list(sampler), epoch
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        step_loss = torch.zeros((), device=device)  # summed on the device: no sync per step
        for micro in range(config.grad_accum):
            first = step_in_epoch * per_step + micro * config.batch_size
            ks = range(first, first + config.batch_size)  # this process's sample numbers in the epoch
            indices = [order[k] for k in ks]
            generators = [slot_generator(config.seed, epoch, dist_info.rank + k * dist_info.world_size) for k in ks]
            batch = make_batch(train_latents.cond_moments[indices], train_latents.target_moments[indices],
                               [prompt_ids[i] for i in indices], prompt_table, generators,
                               backbone.latent_scale, schedule, config.prompt_dropout, device)
            if loss_weights is not None:
                batch.weight = weight_map(train_latents.region_masks[indices], loss_weights).to(device)
            sync = micro == config.grad_accum - 1 or not dist_info.enabled
            with contextlib.nullcontext() if sync else model.no_sync():
                loss = loss_on(model, batch, autocast_dtype)
                scaler.scale(loss / config.grad_accum).backward()
            step_loss += loss.detach() / config.grad_accum
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        window_losses.append(step_loss)
        progress.update(1)
        if done % config.log_every == 0 or done == config.steps:
            seconds = time.perf_counter() - window_start
            last_loss = distributed.mean_across(dist_info, float(torch.stack(window_losses).mean()), device)
            progress.set_postfix(loss=f"{last_loss:.4f}")
            record = {"step": done, "loss": last_loss, "lr": optimizer.param_groups[0]["lr"],
                      "steps_per_s": len(window_losses) / seconds,
                      "samples_per_s": len(window_losses) * global_batch / seconds, "epoch": epoch}
            if device.type == "cuda":
                record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            log(record)
            window_losses, window_start = [], time.perf_counter()
        if main_process and ((config.save_every and done % config.save_every == 0) or done == config.steps):
            save_checkpoint(done)
        if config.val_every and (done % config.val_every == 0 or done == config.steps):
            run_validation(done)
    progress.close()
    distributed.barrier(dist_info)
    if log_file is not None:
        log_file.close()
    if writer is not None:
        writer.close()
    say(f"LoRA written to {lora_path}")
    distributed.cleanup(dist_info)
    return {"lora": str(lora_path), "state": str(state_path), "steps": config.steps, "loss": last_loss,
            "global_batch": global_batch, "issues": [str(i) for i in issues]}


if __name__ == "__main__":
    try:
        main()
    except CtrLoRAError as err:
        sys.exit(f"error: {err}")
