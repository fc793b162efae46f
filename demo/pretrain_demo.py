"""Pretrain the miniature models of the bundled demo (run once by a developer; the weights are committed).

The demo cannot ship Stable Diffusion, so it ships small stand-ins, trained here on
procedural dental scenes (`synth_dental.py` with seed PRETRAIN_SEED, never the demo's own
samples), in the order the real models were made:

1. autoencoder (stands in for SD's VAE): L1 reconstruction + a small KL term, on every kind
   of image the demo handles: renders in [-1, 1] and condition maps in [0, 1] (the range
   CtrLoRA feeds conditions in). Its latent scale is 1 / std of the render latents, the way
   SD's 0.18215 was chosen.
2. text encoder + UNet (SD's CLIP + UNet): an eps-prediction latent diffusion model of the
   renders given their prompts (10% of the prompts dropped to "").
3. Base ControlNet: CtrLoRA's base pretraining in miniature. The trunk starts as a copy of
   the UNet encoder with zero convs at zero; it learns three conditions of the same scenes
   (depth, normal and edge maps), one LoRA per condition, one condition per batch, with the
   trunk, zero convs and norms shared; prompts dropped 30%; UNet and text encoder frozen.

The demo's own condition (lighting blended with segmentation) is never shown to the base:
learning it is what the demo's LoRA has to do.

Writes into --out (default demo/weights): the `TinyBackbone` folder (tiny_config.json,
unet/autoencoder/text_encoder/base .safetensors, stored as float16), one base-condition LoRA
per pretraining condition (lora_<condition>.safetensors, the way official base-condition LoRAs
are exported), pretrain_log.json (settings, losses, timings) and SHA256SUMS.

    python demo/pretrain_demo.py --out demo/weights      # ~35 min on 2 CPU cores

Seeds are fixed (each stage has its own random stream); the same torch version and thread
count reproduce the same weights. With --work DIR, the autoencoder and the UNet + text
encoder are also saved there after their stage and reused by a later run with the same
settings, so the later stages can be tuned without retraining the earlier ones.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

# Shared CPUs: OpenMP threads that spin while waiting slow training down ~10x when another
# process holds a core; waiting passively costs almost nothing on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ctrlora_core.adapters import CtrLoRAAdapter, stack_adapters  # noqa: E402
from ctrlora_core.controlnet import CtrLoRAControlNet  # noqa: E402
from ctrlora_core.files import atomic_write, file_sha256, write_json  # noqa: E402
from ctrlora_core.formats import save_adapter, save_safetensors  # noqa: E402
from ctrlora_core.prompts import PromptTemplate  # noqa: E402
from ctrlora_core.schedule import NoiseSchedule  # noqa: E402
from demo import synth_dental  # noqa: E402
from train.backbones.backbone import sample_latent  # noqa: E402
from train.backbones.tiny import TinyBackbone  # noqa: E402
from train.backbones.tiny_models import TINY_CONFIG, TinyAutoencoder, TinyTextEncoder, TinyUNet  # noqa: E402

PRETRAIN_SEED = 1  # the demo's dataset uses seed 0
BASE_CONDITIONS = ("depth", "normal", "edges")
CONDITION_MAPS = ("lighting", "seg", "depth", "normal", "edges")


@dataclass
class Settings:
    scenes: int = 3000
    size: int = 64
    batch: int = 16
    ae_channels: tuple[int, ...] = (32, 64, 64)  # 4x downsampling: 64 px images -> 16x16 latents
    ae_steps: int = 1000
    ae_lr: float = 1e-3
    kl_weight: float = 1e-4
    unet_steps: int = 1500
    unet_lr: float = 5e-4
    unet_prompt_drop: float = 0.1
    base_steps: int = 1200
    base_lr: float = 3e-4
    base_rank: int = 8
    base_prompt_drop: float = 0.3
    text_vocab: int = 1024
    seed: int = 0


def log(message: str) -> None:
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {message}", flush=True)


def cached_stage(work: Path | None, name: str, key: dict, build: Callable[[], dict[str, torch.Tensor]]
                 ) -> dict[str, torch.Tensor]:
    """A stage's weights: from WORK/<name>.safetensors if it was made with the same `key`, else built (and saved)."""
    key_text = json.dumps(key, sort_keys=True)
    path = None if work is None else work / f"{name}.safetensors"
    if path is not None and path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key_text:
                log(f"{name}: reusing {path}")
                return load_file(str(path))
    tensors = build()
    if path is not None:
        save_safetensors(tensors, path, {"key": key_text})
    return tensors


def stage_generator(seed: int, stage: int) -> torch.Generator:
    """The random stream of one stage; also seeds the global RNG that initialises its models."""
    torch.manual_seed(seed * 100 + stage)
    return torch.Generator().manual_seed(seed * 100 + stage)


def render_scenes(count: int, size: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Render `count` scenes: uint8 arrays [N, H, W, C] per map, plus each scene's prompt."""
    template = PromptTemplate()
    maps: dict[str, list[np.ndarray]] = {k: [] for k in ("target",) + CONDITION_MAPS}
    prompts = []
    for index in range(count):
        scene = synth_dental.make_scene(PRETRAIN_SEED, index)
        rendered = synth_dental.render(scene, size)
        for key in maps:
            image = rendered[key]
            image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
            maps[key].append(np.round(image * 255).astype(np.uint8))
        prompts.append(template.render(scene.jaw, scene.view))
        if (index + 1) % 500 == 0:
            log(f"rendered {index + 1}/{count} scenes")
    return {k: np.stack(v) for k, v in maps.items()}, prompts


def as_tensor(images: np.ndarray, signed: bool) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1] (signed) or [0, 1]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return x * 2.0 - 1.0 if signed else x


def train_loop(name: str, steps: int, params: Iterable[torch.nn.Parameter], lr: float,
               step_loss: Callable[[int], torch.Tensor]) -> list[float]:
    """AdamW with 5% linear warmup then cosine decay; returns the loss of every step."""
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    losses: list[float] = []
    start = time.time()
    for step in range(steps):
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            recent = sum(losses[-100:]) / len(losses[-100:])
            log(f"{name}: step {step + 1}/{steps}  loss {recent:.4f}  {time.time() - start:.0f} s")
    return losses


def train_autoencoder(data: dict[str, np.ndarray], s: Settings, generator: torch.Generator) -> TinyAutoencoder:
    """Reconstruction + KL on renders ([-1, 1]) and condition maps ([0, 1]), half a batch each."""
    ae = TinyAutoencoder(channels=s.ae_channels)
    count = len(data["target"])

    def step_loss(_: int) -> torch.Tensor:
        idx = torch.randint(count, (s.batch,), generator=generator).numpy()
        half = s.batch // 2
        kinds = torch.randint(len(CONDITION_MAPS), (s.batch - half,), generator=generator).tolist()
        renders = as_tensor(data["target"][idx[:half]], signed=True)
        conditions = torch.cat([as_tensor(data[CONDITION_MAPS[k]][i:i + 1], signed=False)
                                for k, i in zip(kinds, idx[half:])])
        images = torch.cat([renders, conditions])
        mean, logvar = ae.encode_moments(images).chunk(2, dim=1)
        latents = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        kl = 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).mean()
        return F.l1_loss(ae.decode(latents), images) + s.kl_weight * kl

    train_loop("autoencoder", s.ae_steps, ae.parameters(), s.ae_lr, step_loss)
    return ae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(ae: TinyAutoencoder, images: np.ndarray, signed: bool, chunk: int = 64) -> torch.Tensor:
    """Posterior moments [N, 8, h, w] of every image."""
    return torch.cat([ae.encode_moments(as_tensor(images[i:i + chunk], signed)) for i in range(0, len(images), chunk)])


@torch.no_grad()
def reconstruction_psnr(ae: TinyAutoencoder, images: np.ndarray, signed: bool) -> float:
    """PSNR (dB, images in [0, 1]) of decode(mean latent) against the images."""
    x = as_tensor(images, signed)
    mean = ae.encode_moments(x).chunk(2, dim=1)[0]
    y = ae.decode(mean).clamp(-1.0 if signed else 0.0, 1.0)
    mse = F.mse_loss((y + 1) / 2, (x + 1) / 2) if signed else F.mse_loss(y, x)
    return float(10 * torch.log10(1.0 / mse))


def drop_prompts(prompts: list[str], rate: float, generator: torch.Generator) -> list[str]:
    keep = torch.rand(len(prompts), generator=generator) >= rate
    return [p if k else "" for p, k in zip(prompts, keep.tolist())]


def train_unet(target_moments: torch.Tensor, prompts: list[str], latent_scale: float, s: Settings,
               generator: torch.Generator) -> tuple[TinyUNet, TinyTextEncoder]:
    """Text encoder + UNet as an eps-prediction latent diffusion model of the renders."""
    unet = TinyUNet(TINY_CONFIG)
    text_encoder = TinyTextEncoder(width=TINY_CONFIG.context_dim, vocab_size=s.text_vocab)
    schedule = NoiseSchedule()

    def step_loss(_: int) -> torch.Tensor:
        idx = torch.randint(len(prompts), (s.batch,), generator=generator)
        x0 = sample_latent(target_moments[idx], latent_scale, generator)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(schedule.num_timesteps, (s.batch,), generator=generator)
        context = text_encoder.encode(drop_prompts([prompts[i] for i in idx], s.unet_prompt_drop, generator))
        return F.mse_loss(unet(schedule.q_sample(x0, t, noise), t, context), noise)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    train_loop("unet+text", s.unet_steps, params, s.unet_lr, step_loss)
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


def task_adapter(base: torch.nn.Module, lora: dict[str, torch.Tensor], name: str) -> CtrLoRAAdapter:
    """A pretraining task's adapter: its own LoRA, the base's (shared, trained) zero convs and norms."""
    modules = dict(base.named_modules())
    tensors = dict(lora)
    for module in base.set_module_names():
        tensors[module + ".weight"] = modules[module].weight
        tensors[module + ".bias"] = modules[module].bias
    return CtrLoRAAdapter(tensors, name=name)


def controlnet_from_unet(unet: TinyUNet) -> CtrLoRAControlNet:
    """A Base ControlNet initialised as official pretraining starts: UNet encoder copied, zero convs zero."""
    model = CtrLoRAControlNet(unet.config)
    encoder = {k: v for k, v in unet.state_dict().items()
               if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    if unexpected or any(not k.startswith(("zero_convs.", "middle_block_out.")) for k in missing):
        raise RuntimeError(f"UNet encoder does not match the ControlNet: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("zero_convs.", "middle_block_out.")):
                p.zero_()
    return model


def train_base(unet: TinyUNet, text_encoder: TinyTextEncoder, target_moments: torch.Tensor,
               hint_moments: dict[str, torch.Tensor], prompts: list[str], latent_scale: float, s: Settings,
               generator: torch.Generator):
    """CtrLoRA base pretraining: shared trunk + zero convs + norms, one LoRA per condition."""
    base = controlnet_from_unet(unet).train()
    loras = {}
    for task in BASE_CONDITIONS:
        fresh = CtrLoRAAdapter.fresh(base, s.base_rank, generator, name=task)
        loras[task] = {k: torch.nn.Parameter(v) for k, v in fresh.tensors.items() if "lora_layer" in k}
    schedule = NoiseSchedule()
    contexts = {p: text_encoder.encode([p]) for p in set(prompts) | {""}}

    def step_loss(step: int) -> torch.Tensor:
        task = BASE_CONDITIONS[step % len(BASE_CONDITIONS)]
        idx = torch.randint(len(prompts), (s.batch,), generator=generator)
        x0 = sample_latent(target_moments[idx], latent_scale, generator)
        hint = sample_latent(hint_moments[task][idx], latent_scale, generator)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(schedule.num_timesteps, (s.batch,), generator=generator)
        context = torch.cat([contexts[p] for p in drop_prompts([prompts[i] for i in idx], s.base_prompt_drop,
                                                                generator)])
        stack = stack_adapters([task_adapter(base, loras[task], task)])
        control = base(hint, t, context, stack)
        return F.mse_loss(unet(schedule.q_sample(x0, t, noise), t, context, control), noise)

    params = list(base.parameters()) + [p for lora in loras.values() for p in lora.values()]
    train_loop("base controlnet", s.base_steps, params, s.base_lr, step_loss)
    base.eval().requires_grad_(False)
    adapters = {task: CtrLoRAAdapter({k: v.detach().clone() for k, v in task_adapter(base, lora, task).tensors.items()},
                                     name=task)
                for task, lora in loras.items()}
    return base, adapters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the bundled demo's miniature models.")
    parser.add_argument("--out", default="demo/weights")
    parser.add_argument("--work", default=None, help="folder to keep and reuse the stage results in (optional)")
    for field, value in asdict(Settings()).items():
        if not isinstance(value, tuple):
            parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    s = Settings(**{k: getattr(args, k) for k in asdict(Settings()) if hasattr(args, k)})
    work = Path(args.work) if args.work else None
    timings: dict[str, float] = {}
    began = time.time()

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.time() - since, 1)
        log(f"{name} done in {timings[name]:.0f} s")
        return time.time()

    clock = time.time()
    log(f"rendering {s.scenes} pretraining scenes (seed {PRETRAIN_SEED}) at {s.size} px")
    data, prompts = render_scenes(s.scenes, s.size)
    held_out = slice(len(prompts) - 64, None)  # excluded from every stage, for the quality figures
    train = {k: v[: held_out.start] for k, v in data.items()}
    train_prompts = prompts[: held_out.start]
    clock = lap("render", clock)

    settings = asdict(s)
    ae_key = {k: settings[k] for k in ("scenes", "size", "batch", "seed")}
    ae_key.update({k: v for k, v in settings.items() if k.startswith(("ae_", "kl_"))})
    ae = TinyAutoencoder(channels=s.ae_channels)
    ae.load_state_dict(cached_stage(
        work, "autoencoder", ae_key, lambda: train_autoencoder(train, s, stage_generator(s.seed, 1)).state_dict()))
    ae.eval().requires_grad_(False)
    generator = stage_generator(s.seed, 2)
    stats = {
        "ae_psnr_renders_db": reconstruction_psnr(ae, data["target"][held_out], signed=True),
        "ae_psnr_conditions_db": {k: reconstruction_psnr(ae, data[k][held_out], signed=False)
                                  for k in CONDITION_MAPS},
    }
    target_moments = encode_all(ae, train["target"], signed=True)
    latent_scale = float(1.0 / sample_latent(target_moments, 1.0, generator).std())
    stats["latent_scale"] = latent_scale
    stats["posterior_std_mean"] = float(torch.exp(0.5 * target_moments[:, 4:]).mean())
    log(f"autoencoder: {stats}")
    clock = lap("autoencoder", clock)

    def build_unet() -> dict[str, torch.Tensor]:
        unet, text_encoder = train_unet(target_moments, train_prompts, latent_scale, s, stage_generator(s.seed, 3))
        return {**{"unet." + k: v for k, v in unet.state_dict().items()},
                **{"text." + k: v for k, v in text_encoder.state_dict().items()}}

    unet_key = {**ae_key, **{k: v for k, v in settings.items() if k.startswith(("unet_", "text_"))}}
    tensors = cached_stage(work, "unet_text", unet_key, build_unet)
    unet = TinyUNet(TINY_CONFIG)
    text_encoder = TinyTextEncoder(width=TINY_CONFIG.context_dim, vocab_size=s.text_vocab)
    for prefix, model in (("unet.", unet), ("text.", text_encoder)):
        model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        model.eval().requires_grad_(False)
    clock = lap("unet+text", clock)

    hint_moments = {task: encode_all(ae, train[task], signed=False) for task in BASE_CONDITIONS}
    base, adapters = train_base(unet, text_encoder, target_moments, hint_moments, train_prompts, latent_scale, s,
                                stage_generator(s.seed, 4))
    clock = lap("base", clock)

    out = Path(args.out)
    for model in (unet, ae, text_encoder, base):
        model.half()
    TinyBackbone(unet, ae, text_encoder, base, latent_scale=latent_scale, identity="demo-weights").save(out)
    base_sha = file_sha256(out / "base.safetensors")
    for task, adapter in adapters.items():
        save_adapter(adapter, out / f"lora_{task}.safetensors",
                     {"condition": task, "base_sha256": base_sha, "training_steps": s.base_steps,
                      "resolution": s.size})
    timings["total"] = round(time.time() - began, 1)
    record = {"settings": settings, "pretrain_seed": PRETRAIN_SEED, "stats": stats, "timings_s": timings,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "reused_stages": work is not None}
    write_json(out / "pretrain_log.json", record)
    files = sorted(p for p in out.iterdir() if p.suffix in (".safetensors", ".json"))
    sums = "".join(f"{file_sha256(p)}  {p.name}\n" for p in files)
    atomic_write(out / "SHA256SUMS", lambda tmp: Path(tmp).write_text(sums))
    log(f"wrote {len(files)} files to {out} in {timings['total'] / 60:.1f} min")


if __name__ == "__main__":
    main()
