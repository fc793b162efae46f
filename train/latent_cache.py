"""Encode the dataset once: VAE posterior moments of every pair and text embeddings of every prompt.

The training loop then never touches the VAE or the text encoder. Moments (mean and
log-variance) are kept rather than one latent, so every step can draw a fresh posterior
sample as the official trainer does (it re-encodes and samples each step).

Cache files live in a folder and are named by a content key; a key changes, and the
cache is rebuilt, when anything it depends on changes:

- latents: the image files (absolute paths, sizes, modification times; in the maps layout
  every map file), the maps layout's blend (maps, alpha, mode, flattening colour), the
  model identity (checkpoint path + size + mtime), the resolution and CACHE_VERSION; with
  a region-weighted loss also its regions, palette and tolerance, since the file then
  holds the region masks of every pair on the latent grid (`train.regions.latent_masks`);
- text: the distinct prompts (plus "") and the model identity.

Files are written atomically, and the key is stored inside and checked on load.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from ctrlora_core.conditions import load_map
from ctrlora_core.errors import CtrLoRAError
from ctrlora_core.files import file_stamp
from ctrlora_core.formats import save_safetensors
from train.backbones.backbone import Backbone
from train.dataset import SEGMENTATION, Pair, load_pair
from train.regions import RegionWeights, latent_masks

CACHE_VERSION = "1"


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def latents_key(pairs: Sequence[Pair], identity: str, resolution: tuple[int, int],
                regions: RegionWeights | None = None) -> str:
    """Content key of the image latents (see module docstring)."""
    files = [sum((list(file_stamp(f)) for f in (*p.condition_files, p.target)), []) for p in pairs]
    payload = {"kind": "latents", "version": CACHE_VERSION, "model": identity, "resolution": list(resolution),
               "files": files}
    blends = sorted({json.dumps(asdict(p.blend), sort_keys=True) for p in pairs if p.blend is not None})
    if blends:
        payload["blend"] = blends
    if regions is not None:
        payload["regions"] = regions.cache_key()
    return _digest(payload)


def text_key(prompts: Sequence[str], identity: str) -> str:
    """Content key of the prompt embeddings."""
    return _digest({"kind": "text", "version": CACHE_VERSION, "model": identity, "prompts": list(prompts)})


@dataclass
class LatentSet:
    """Posterior moments [N, 2C, h, w] (float32) of conditions (in [0, 1]) and targets (in [-1, 1]);
    with a region-weighted loss also the region masks [N, R, h, w] and pixel counts [N, R]."""

    cond_moments: torch.Tensor
    target_moments: torch.Tensor
    region_masks: torch.Tensor | None = None
    region_pixels: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in values.items() if value is not None}


@dataclass
class PromptSet:
    """Embeddings [P, L, D] of the distinct prompts; row 0 is the empty prompt ""."""

    prompts: list[str]
    embeddings: torch.Tensor

    def index(self, prompt: str) -> int:
        return self.prompts.index(prompt)


def _load_checked(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """Tensors of a cache file if it exists and carries `key`; None otherwise."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
    return load_file(str(path))


def segmentation_file(pair: Pair) -> Path:
    """The segmentation map of a maps-layout pair (the region masks come from it)."""
    path = pair.map_file(SEGMENTATION)
    if path is None:
        raise CtrLoRAError(f"{pair.name}: a region-weighted loss needs the maps layout with a {SEGMENTATION} map")
    return path


def encode_pairs(backbone: Backbone, pairs: Sequence[Pair], batch_size: int = 8,
                 show_progress: bool = True, regions: RegionWeights | None = None) -> LatentSet:
    """VAE moments of every pair (conditions enter the VAE in [0, 1], the official quirk), and the
    region masks on the latent grid when `regions` is given."""
    conds, targets, masks, pixels = [], [], [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc="encoding images", unit="batch",
                      disable=not show_progress):
        chunk = pairs[start:start + batch_size]
        loaded = [load_pair(p) for p in chunk]
        cond = torch.stack([c for c, _ in loaded])
        target = torch.stack([t for _, t in loaded])
        conds.append(backbone.encode_moments(cond).float().cpu())
        targets.append(backbone.encode_moments(target).float().cpu())
        for pair in chunk if regions is not None else ():
            seg = load_map(segmentation_file(pair), pair.blend.seg_background)
            pair_masks, pair_pixels = latent_masks(seg, regions, tuple(conds[-1].shape[-2:]))
            masks.append(pair_masks)
            pixels.append(pair_pixels)
    if regions is None:
        return LatentSet(torch.cat(conds), torch.cat(targets))
    return LatentSet(torch.cat(conds), torch.cat(targets), torch.stack(masks), torch.stack(pixels))


def latents_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"latents-{key[:24]}.safetensors"


def text_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"text-{key[:24]}.safetensors"


def cached_latents(backbone: Backbone, pairs: Sequence[Pair], resolution: tuple[int, int],
                   cache_dir: str | os.PathLike | None, identity: str, build: bool = True,
                   batch_size: int = 8, show_progress: bool = True,
                   regions: RegionWeights | None = None) -> tuple[LatentSet, bool]:
    """Latents of `pairs` (and their region masks when `regions` is given), from the cache when
    its key matches; returns (latents, built_now).

    With build=False a missing cache is an error (other DDP ranks wait for the builder).
    cache_dir None: encode in memory, nothing written.
    """
    key = latents_key(pairs, identity, resolution, regions)
    if cache_dir is not None:
        path = latents_path(cache_dir, key)
        tensors = _load_checked(path, key)
        if tensors is not None:
            return LatentSet(**tensors), False
        if not build:
            raise FileNotFoundError(f"{path}: latent cache missing (it should have been built by local rank 0)")
    latents = encode_pairs(backbone, pairs, batch_size, show_progress, regions)
    if cache_dir is not None:
        save_safetensors(latents.tensors(), latents_path(cache_dir, key),
                         {"key": key, "count": str(len(pairs)), "names": json.dumps([p.name for p in pairs])})
    return latents, True


def cached_prompts(backbone: Backbone, prompts: Sequence[str], cache_dir: str | os.PathLike | None,
                   identity: str, build: bool = True, batch_size: int = 32) -> tuple[PromptSet, bool]:
    """Embeddings of "" and of the distinct `prompts` (sorted), cached like `cached_latents`."""
    distinct = [""] + sorted(set(prompts) - {""})
    key = text_key(distinct, identity)
    if cache_dir is not None:
        path = text_path(cache_dir, key)
        tensors = _load_checked(path, key)
        if tensors is not None:
            return PromptSet(distinct, tensors["embeddings"]), False
        if not build:
            raise FileNotFoundError(f"{path}: text cache missing (it should have been built by local rank 0)")
    chunks = [backbone.encode_text(distinct[i:i + batch_size]).float().cpu()
              for i in range(0, len(distinct), batch_size)]
    prompt_set = PromptSet(distinct, torch.cat(chunks))
    if cache_dir is not None:
        save_safetensors({"embeddings": prompt_set.embeddings}, text_path(cache_dir, key),
                         {"key": key, "prompts": json.dumps(distinct)})
    return prompt_set, True
