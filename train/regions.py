"""The region-weighted loss (the dental recipe: teeth weighted 5x) from the segmentation map.

Per pair, the segmentation map gives one mask per region (`ctrlora_core.conditions.region_masks`:
nearest palette colour within a tolerance) and the loss weight of every latent position is

    W = 1 + sum over weighted regions r of M_r * (w_r - 1),     loss = mean(W * (eps - eps_hat)^2)

(mean over batch, channels and positions). W lives on the latent grid: it is resized
bilinearly from the image to the latent size, as the recipe says (`F.interpolate`, bilinear,
align_corners False, no antialiasing: at SD's 8x reduction a latent position takes the mean
of the 2x2 pixels at the centre of its 8x8 cell). Resizing is linear, so resizing the masks
and then forming W equals resizing W; the latent cache keeps the resized masks
(`latent_masks`) and the weights may change without re-encoding. Pixels in no region (far
from every palette colour) and the regions without a weight have weight 1.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ctrlora_core.conditions import DENTAL_PALETTE, RGB8, SEG_TOLERANCE, region_masks
from ctrlora_core.errors import CtrLoRAError

_HEX_COLOUR = re.compile(r"#?([0-9a-fA-F]{6})")


def _items(text: str, flag: str) -> list[tuple[str, str]]:
    """'a=1,b=2' -> [('a', '1'), ('b', '2')], names lower case; an error names the flag."""
    items = []
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.partition("=")
        if not part or not sep or not name.strip() or not value.strip():
            raise CtrLoRAError(f"{flag} {text!r}: expected name=value pairs separated by commas, got {part!r}")
        items.append((name.strip().lower(), value.strip()))
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise CtrLoRAError(f"{flag} {text!r}: a region is named twice")
    return items


def parse_palette(text: str, base: dict[str, RGB8] = DENTAL_PALETTE) -> dict[str, RGB8]:
    """`base` with the colours of 'name=#RRGGBB,...' replacing or adding entries ("" = `base`)."""
    palette = dict(base)
    for name, value in _items(text, "--seg-palette") if text.strip() else []:
        match = _HEX_COLOUR.fullmatch(value)
        if not match:
            raise CtrLoRAError(f"--seg-palette: colour of {name!r} must be #RRGGBB (hex), got {value!r}")
        digits = match.group(1)
        palette[name] = (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))
    return palette


def format_palette(palette: dict[str, RGB8]) -> str:
    """The --seg-palette text of a palette: 'teeth=#C4C474,gum=#CC442C,background=#383838'."""
    return ",".join(f"{name}=#{r:02X}{g:02X}{b:02X}" for name, (r, g, b) in palette.items())


@dataclass(frozen=True)
class RegionWeights:
    """Loss weights of segmentation regions, the palette that finds the regions and its tolerance."""

    weights: tuple[tuple[str, float], ...]  # (region, weight) in the order given
    palette: tuple[tuple[str, RGB8], ...]
    tolerance: float = SEG_TOLERANCE

    @classmethod
    def parse(cls, weights: str, palette: str = "", tolerance: float = SEG_TOLERANCE) -> "RegionWeights":
        """From --region-weights ('teeth=5,gum=1'), --seg-palette and --seg-tolerance, checked."""
        colours = parse_palette(palette)
        parsed = []
        for name, value in _items(weights, "--region-weights"):
            try:
                weight = float(value)
            except ValueError:
                raise CtrLoRAError(f"--region-weights: weight of {name!r} must be a number, got {value!r}") from None
            if not (weight >= 0.0 and np.isfinite(weight)):
                raise CtrLoRAError(f"--region-weights: weight of {name!r} must be finite and >= 0, got {value}")
            if name not in colours:
                raise CtrLoRAError(f"--region-weights: region {name!r} has no colour; the palette has "
                                   f"{', '.join(colours)} (add one with --seg-palette {name}=#RRGGBB)")
            parsed.append((name, weight))
        if not tolerance >= 0.0:
            raise CtrLoRAError(f"--seg-tolerance must be >= 0, got {tolerance}")
        return cls(tuple(parsed), tuple(colours.items()), float(tolerance))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.weights)

    def weight_tensor(self) -> torch.Tensor:
        """The weights [R] in the order of `names` (and of the cached masks)."""
        return torch.tensor([w for _, w in self.weights], dtype=torch.float32)

    def cache_key(self) -> dict:
        """What the cached masks depend on (not the weights)."""
        return {"regions": list(self.names), "palette": format_palette(dict(self.palette)),
                "tolerance": self.tolerance}

    def metadata(self) -> dict[str, str]:
        """LoRA metadata entries."""
        return {"region_weights": ",".join(f"{name}={weight:g}" for name, weight in self.weights),
                "seg_palette": format_palette(dict(self.palette)), "seg_tolerance": f"{self.tolerance:g}"}


def latent_masks(seg: np.ndarray, regions: RegionWeights, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks [R, h, w] float32 in [0, 1] on the latent grid `size` = (h, w), pixel counts [R] at full size)
    of the weighted regions of a segmentation map (float HWC in [0, 1])."""
    masks = region_masks(seg, dict(regions.palette), regions.tolerance)
    full = torch.from_numpy(np.stack([masks[name] for name in regions.names])).float()  # [R, H, W]
    resized = F.interpolate(full[None], size=size, mode="bilinear", align_corners=False)[0]
    return resized.clamp(0.0, 1.0), full.flatten(1).sum(1).long()


def weight_map(masks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """W = 1 + sum_r masks_r * (w_r - 1): [B, 1, h, w] from masks [B, R, h, w] and weights [R]."""
    scale = (weights.to(masks.device, masks.dtype) - 1.0)[None, :, None, None]
    return 1.0 + (masks * scale).sum(1, keepdim=True)


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean(weight * (prediction - target)^2); weight broadcasts ([B, 1, h, w] over channels)."""
    return (weight * F.mse_loss(prediction, target, reduction="none")).mean()


def missing_region_warnings(files: list[str], pixels: torch.Tensor, regions: RegionWeights) -> list[str]:
    """One line per segmentation file in which a region with a weight other than 1 has no pixel."""
    palette = dict(regions.palette)
    lines = []
    for file, counts in zip(files, pixels.tolist()):
        absent = [name for (name, weight), count in zip(regions.weights, counts) if count == 0 and weight != 1.0]
        if absent:
            colours = ", ".join(f"{name} {format_palette({name: palette[name]}).split('=')[1]}" for name in absent)
            lines.append(f"{file}: no pixel within {regions.tolerance:g} of the colour of {colours}: its loss weight "
                         "applies nowhere in this pair (check --seg-palette / --seg-tolerance)")
    return lines
