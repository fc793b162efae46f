"""Condition-image operations: loading, range checks, layout conversion, and the
dental lighting/segmentation blend.

Value range
-----------
Condition images are float in [0, 1] everywhere in this package. They also enter
the SD VAE in [0, 1]: the official CtrLoRA code feeds `source / 255` to the VAE
encoder without the usual `* 2 - 1` (the VAE normally expects [-1, 1]), and the
Base ControlNet was trained on latents made that way. Ground-truth images, in
contrast, use the normal [-1, 1]. `check_unit_range` guards the [0, 1] contract.

Dental blend
------------
The dental condition is a lighting map `l` blended with a segmentation map `s` of
a 3D teeth model. Both are float RGB in [0, 1]. Before blending, a 1-channel
(grayscale) image is repeated to 3 channels and the 4th (alpha) channel of an
RGBA image is dropped (not composited). Then, per pixel and per channel, in
floating point:

    f_alpha(l, s)      = s
    f_multiply(l, s)   = l * s
    f_screen(l, s)     = 1 - (1 - l) * (1 - s)
    f_overlay(l, s)    = 2 * l * s                  if l < 0.5
                         1 - 2 * (1 - l) * (1 - s)  otherwise (l >= 0.5)
    f_soft_light(l, s) = (1 - 2 * s) * l * l + 2 * s * l      (pegtop formula)

    result = clamp((1 - alpha) * l + alpha * f_mode(l, s), 0, 1)

so mode "alpha" is a plain cross-fade, alpha = 0 returns the lighting map and
alpha = 1 returns the pure blend. The lighting map is the base layer (it decides
the overlay branch) and the segmentation map the blend layer. A JavaScript preview
reimplements these formulas; `BLEND_MODES` lists the valid mode names.

Transparent maps
----------------
A render with a transparent background is flattened before blending, so the
background gets a defined colour instead of whatever RGB the file stores under
alpha 0: `flatten_alpha` composites the map over a flat colour,

    flat = image * (1 - t) + background * t,     t = transparency = 1 - alpha

(t is ComfyUI's MASK convention, the second output of Load Image). The trainer
(`load_map`) and the Blend Lighting + Segmentation node (its optional mask inputs)
flatten the segmentation map over the palette background and every other map over
black, so both build the same condition from the same files.

Segmentation regions
--------------------
`DENTAL_PALETTE` holds the flat colours of the dental segmentation maps (8-bit RGB).
`region_masks` labels every pixel with its nearest palette colour, when that colour is
within `tolerance` (Euclidean distance in 8-bit RGB units, 0-441; SEG_TOLERANCE = 40
by default, so anti-aliased edge pixels half-way between two colours, about 74 away
from both, belong to no region).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch
from PIL import Image

from .errors import CtrLoRAError

BLEND_MODES: tuple[str, ...] = ("alpha", "multiply", "screen", "overlay", "soft_light")

# How far outside [0, 1] a value may be before it counts as out of range
# (float rounding, float16 storage).
UNIT_RANGE_TOLERANCE = 1e-3

Layout = Literal["BHWC", "BCHW"]
ImageT = TypeVar("ImageT", np.ndarray, torch.Tensor)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B")

RGB8 = tuple[int, int, int]
# Flat colours of the dental segmentation maps (8-bit RGB).
DENTAL_PALETTE: dict[str, RGB8] = {"teeth": (196, 196, 116), "gum": (204, 68, 44), "background": (56, 56, 56)}
# Largest distance from its nearest palette colour (Euclidean, 8-bit RGB units) of a region pixel.
SEG_TOLERANCE = 40.0
# The dental blend's alpha: the segmentation at 30 % opacity over the lighting map (the first user's finding).
DENTAL_BLEND_ALPHA = 0.3


class ConditionError(CtrLoRAError, ValueError):
    """A condition image is unreadable or has the wrong shape, dtype or value range."""


def check_unit_range(x: np.ndarray | torch.Tensor, name: str) -> None:
    """Raise ConditionError naming `name` unless every value of `x` is finite and in [0, 1].

    A tolerance of UNIT_RANGE_TOLERANCE is allowed on both sides.
    """
    values = torch.as_tensor(x)
    if values.numel() == 0:
        return
    if not bool(torch.isfinite(values).all()):
        raise ConditionError(f"{name}: contains NaN or infinite values; expected values in [0, 1]")
    low, high = float(values.min()), float(values.max())
    if low < -UNIT_RANGE_TOLERANCE or high > 1.0 + UNIT_RANGE_TOLERANCE:
        raise ConditionError(
            f"{name}: values must be in [0, 1], got min {low:.4g}, max {high:.4g}"
        )


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as float32 RGB, HWC, values in [0, 1].

    Grayscale, palette and RGBA files become RGB (alpha dropped); 16-bit
    grayscale files are scaled by 1/65535, everything else by 1/255.
    """
    return _read_image(path)[0]


def load_map(path: str | Path, background: RGB8 = (0, 0, 0)) -> np.ndarray:
    """`load_image`, with a transparent image flattened over `background` (8-bit RGB, see `flatten_alpha`).

    The pixels and the transparency are read as ComfyUI's Load Image reads them
    (RGB / 255 and 1 - alpha / 255 in float32), so a map gives the same values here
    and in a workflow.
    """
    rgb, transparency = _read_image(path)
    return rgb if transparency is None else flatten_alpha(rgb, transparency, background)


def _read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(float32 RGB HWC in [0, 1], float32 transparency HW or None when the file has no alpha)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in _SIXTEEN_BIT_MODES:
                gray = np.asarray(img, dtype=np.float32) / 65535.0
                return np.repeat(gray[:, :, None], 3, axis=2), None
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            if "A" in img.getbands():
                alpha = img.getchannel("A")
            elif img.mode == "P" and "transparency" in img.info:
                alpha = img.convert("RGBA").getchannel("A")
            else:
                return rgb, None
            return rgb, 1.0 - np.asarray(alpha).astype(np.float32) / 255.0
    except OSError as err:
        raise ConditionError(f"{path}: cannot read image ({err})") from err


def flatten_alpha(image: ImageT, transparency: ImageT, background: RGB8) -> ImageT:
    """`image * (1 - t) + background * t`: the image composited over a flat 8-bit RGB colour.

    `image` is float RGB [H, W, 3] or [B, H, W, 3] in [0, 1]; `transparency` t is in [0, 1]
    shaped [H, W] or [B, H, W] (1 = fully transparent, ComfyUI's MASK). The result has
    `image`'s type and dtype.
    """
    img = torch.from_numpy(image) if isinstance(image, np.ndarray) else image
    t = torch.from_numpy(transparency) if isinstance(transparency, np.ndarray) else transparency
    if img.ndim not in (3, 4) or img.shape[-1] != 3:
        raise ConditionError(f"image: expected float RGB [H, W, 3] or [B, H, W, 3], got {tuple(img.shape)}")
    if t.shape[-2:] != img.shape[-3:-1]:
        raise ConditionError(f"transparency mask {tuple(t.shape)} does not match the image {tuple(img.shape)}")
    check_unit_range(t, "transparency mask")
    t = t.to(device=img.device, dtype=img.dtype)[..., None]
    colour = torch.tensor(background, dtype=img.dtype, device=img.device) / 255.0
    flat = img * (1 - t) + colour * t
    return flat.numpy() if isinstance(image, np.ndarray) else flat


def region_masks(seg: ImageT, palette: dict[str, RGB8] = DENTAL_PALETTE,
                 tolerance: float = SEG_TOLERANCE) -> dict[str, ImageT]:
    """Per palette entry, the boolean mask of the pixels whose nearest palette colour it is, within `tolerance`.

    `seg` is a float image [..., H, W, C] in [0, 1] (C = 1, 3 or 4, as `blend_lighting_seg`);
    distances are Euclidean in 8-bit RGB units. Masks are shaped [..., H, W], numpy
    when `seg` is numpy, else torch on its device. Pixels far from every colour are in no mask.
    """
    if not palette:
        raise ConditionError("segmentation palette: no colours")
    pixels = _as_rgb_tensor(seg, "segmentation").float() * 255.0
    colours = torch.tensor(list(palette.values()), dtype=torch.float32, device=pixels.device)
    distance = (pixels[..., None, :] - colours).pow(2).sum(-1).sqrt()  # [..., H, W, colours]
    nearest_distance, nearest = distance.min(dim=-1)
    within = nearest_distance <= tolerance
    masks = {name: (nearest == k) & within for k, name in enumerate(palette)}
    return {name: m.cpu().numpy() for name, m in masks.items()} if isinstance(seg, np.ndarray) else masks


def tensor_to_image(tensor: torch.Tensor, layout: Layout = "BHWC") -> np.ndarray:
    """Float 4-D tensor in [0, 1] with the given layout -> uint8 numpy BHWC (rounded).

    Clamp decoded VAE output to [0, 1] first; other out-of-range values raise.
    """
    _check_layout(layout)
    if tensor.ndim != 4:
        raise ConditionError(f"tensor: expected a 4-D {layout} tensor, got shape {tuple(tensor.shape)}")
    check_unit_range(tensor, "tensor")
    values = tensor.detach().float().cpu()
    if layout == "BCHW":
        values = values.permute(0, 2, 3, 1)
    return np.clip(np.round(values.numpy() * 255.0), 0, 255).astype(np.uint8)


def blend_lighting_seg(
    lighting: ImageT, seg: ImageT, alpha: float = 0.5, mode: str = "alpha"
) -> ImageT:
    """Blend a lighting map with a segmentation map (formulas in the module docstring).

    Inputs are float images in [0, 1], numpy arrays or torch tensors, shaped
    [H, W, C] or [B, H, W, C] (both the same rank; a batch of 1 broadcasts), with
    C = 1, 3 or 4. The result is a 3-channel image of `lighting`'s type, dtype and
    device.
    """
    if mode not in BLEND_MODES:
        raise ConditionError(f"blend mode: unknown mode {mode!r}; valid modes: {', '.join(BLEND_MODES)}")
    if not 0.0 <= alpha <= 1.0:
        raise ConditionError(f"blend alpha: must be in [0, 1], got {alpha}")
    l = _as_rgb_tensor(lighting, "lighting")
    s = _as_rgb_tensor(seg, "seg").to(device=l.device, dtype=l.dtype)
    _check_same_size(tuple(lighting.shape), tuple(seg.shape))
    check_unit_range(l, "lighting")
    check_unit_range(s, "seg")

    if mode == "alpha":
        blended = s
    elif mode == "multiply":
        blended = l * s
    elif mode == "screen":
        blended = 1 - (1 - l) * (1 - s)
    elif mode == "overlay":
        blended = torch.where(l < 0.5, 2 * l * s, 1 - 2 * (1 - l) * (1 - s))
    else:  # soft_light, pegtop
        blended = (1 - 2 * s) * l * l + 2 * s * l
    result = ((1 - alpha) * l + alpha * blended).clamp(0.0, 1.0)
    return result.numpy() if isinstance(lighting, np.ndarray) else result


def _check_layout(layout: str) -> None:
    if layout not in ("BHWC", "BCHW"):
        raise ConditionError(f"layout: expected 'BHWC' or 'BCHW', got {layout!r}")


def _as_rgb_tensor(image: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """Validate a [H,W,C]/[B,H,W,C] float image and return it as a 3-channel tensor."""
    if not isinstance(image, (np.ndarray, torch.Tensor)):
        raise ConditionError(f"{name}: expected a numpy array or torch tensor, got {type(image).__name__}")
    tensor = torch.from_numpy(image) if isinstance(image, np.ndarray) else image
    if not tensor.is_floating_point():
        raise ConditionError(f"{name}: expected a float image in [0, 1], got dtype {tensor.dtype}")
    if tensor.ndim not in (3, 4):
        raise ConditionError(f"{name}: expected shape [H, W, C] or [B, H, W, C], got {tuple(tensor.shape)}")
    channels = tensor.shape[-1]
    if channels == 1:
        return tensor.expand(*tensor.shape[:-1], 3)
    if channels == 3:
        return tensor
    if channels == 4:
        return tensor[..., :3]
    raise ConditionError(f"{name}: expected 1, 3 or 4 channels (last dim), got shape {tuple(tensor.shape)}")


def _check_same_size(lighting: tuple[int, ...], seg: tuple[int, ...]) -> None:
    """Both shapes must have the same rank and H, W; batch sizes equal or one of them 1."""
    same_hw = len(lighting) == len(seg) and lighting[-3:-1] == seg[-3:-1]
    batch_ok = len(lighting) == 3 or lighting[0] == seg[0] or 1 in (lighting[0], seg[0])
    if not (same_hw and batch_ok):
        raise ConditionError(f"lighting and seg must have the same size: lighting {lighting} vs seg {seg}")
