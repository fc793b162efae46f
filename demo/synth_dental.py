"""Procedural dental dataset for the bundled demo: teeth arches rendered from 5 views.

Every sample is one dental arch (upper or lower jaw) seen from one view (top, front,
bottom, left, right), possibly turned a little towards a side (a compound view such as
"front top left"), drawn with numpy only by ray casting a union of ellipsoids:

- teeth: 14 per arch (incisors to second molars), each an ellipsoid sized like the
  real tooth type, placed along a parabolic arch; premolars and molars get cusps;
- gums: one wider, flatter ellipsoid per tooth at the gum line, merging into a ridge.

Model space: x = left-right, y = towards the lips, z = up; lower teeth point up (+z),
upper teeth point down. An orthographic camera looks along the view direction with a
small random tilt, and a directional light comes from the camera's side.

Per sample the renderer produces (all float32 in [0, 1], HWC):

- `lighting`: Lambertian shading n.l with cast shadows, background 0 (1 channel);
- `seg`:      one flat colour per tooth position (`TOOTH_COLOURS`), gums grey, background black;
- `target`:   the "photo": textured enamel and gums, ambient + diffuse + specular
              highlights, cast shadows, a fixed studio backdrop (`BACKDROP`: one
              setup, so the background is predictable from the condition);
- `depth`, `normal`, `edges`: extra maps of the same scene (used to pretrain the
  demo's Base ControlNet on conditions other than the demo's own).

The dataset is written in the maps layout (`write_maps_dataset`, the user's real data): per
sample a grey lighting map in lighting/, a flat-colour segmentation map in segmentation/
(`segmentation_map`: teeth, gums and a dark grey background in the colours of `SEG_PALETTE`)
and the render in target/, all under one map-kind-free key shaped like the user's file names:
the jaw, a patient or model id, the view with its detail words and sometimes a trailing tag
(`upper_3C6EF372_front_top_left.png`, `lower_patient7_bottom.png`, `upper_smith_right_12.png`,
`lower_patient17_front_slightly_up_weight_5.png`; `sample_key`). The trainer blends the two
maps into the condition.

Everything is deterministic given (seed, index); `render(make_scene(seed, index))` is
what the demo's miniature models were pretrained on (pretrain_demo.py), so it must not
change for scenes without a view detail.

CLI: python demo/synth_dental.py --out data/synth --count 200 --size 64
"""
from __future__ import annotations

import argparse
import colorsys
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ctrlora_core.prompts import JAWS, VIEWS

# Tooth types from the midline backwards: width (mesiodistal), depth (buccolingual),
# crown height and number of cusps; sizes in decimetres of a real adult arch (1 = 10 cm).
TOOTH_TYPES = (
    # name,            width, depth, height, cusps
    ("central incisor", 0.085, 0.065, 0.100, 0),
    ("lateral incisor", 0.066, 0.060, 0.088, 0),
    ("canine",          0.077, 0.078, 0.100, 0),
    ("first premolar",  0.070, 0.088, 0.082, 2),
    ("second premolar", 0.068, 0.088, 0.075, 2),
    ("first molar",     0.102, 0.108, 0.072, 4),
    ("second molar",    0.095, 0.104, 0.068, 4),
)
TEETH_PER_SIDE = len(TOOTH_TYPES)
NUM_TEETH = 2 * TEETH_PER_SIDE
GUM_LABEL = NUM_TEETH
BACKGROUND_LABEL = -1

# One colour per tooth position, ordered from the right second molar to the left one.
TOOTH_COLOURS = np.array(
    [colorsys.hsv_to_rgb(k / NUM_TEETH, 0.85 if k % 2 else 0.6, 1.0 if k % 2 else 0.8) for k in range(NUM_TEETH)],
    dtype=np.float32)
GUM_COLOUR = np.array([0.5, 0.5, 0.5], dtype=np.float32)

# The user's segmentation colours (uint8 RGB, flat): the same as ctrlora_core.conditions.DENTAL_PALETTE.
SEG_PALETTE = {"teeth": (196, 196, 116), "gum": (204, 68, 44), "background": (56, 56, 56)}
MAP_FOLDERS = ("lighting", "segmentation", "target")

# Detail words of a compound view ("front_top_left"): the camera moves towards that side of
# the image by DETAIL_TILT_DEG (half of it after "slightly"), still aiming at the arch.
DETAIL_SIDES = {"top": (0.0, 1.0), "up": (0.0, 1.0), "bottom": (0.0, -1.0), "down": (0.0, -1.0),
                "left": (-1.0, 0.0), "right": (1.0, 0.0)}
DETAIL_TILT_DEG = 15.0
# The compound views each view gets in the maps layout (one drawn per sample), and the id
# styles and trailing tags of the user's file names.
VIEW_DETAILS = {
    "front": ((), ("top", "left"), ("top", "right"), ("slightly", "up")),
    "top": ((), ("left",), ("right",)),
    "bottom": ((), ("left",), ("right",)),
    "left": ((), ("slightly", "up")),
    "right": ((), ("slightly", "down")),
}
SURNAMES = ("smith", "garcia", "nguyen", "mueller", "rossi", "kowalski", "tanaka", "okafor")
TAILS = ("", "", "", "_1", "_2", "_weight_5")
_NAME_STREAM = 7  # the names' random stream, apart from the scenes' [seed, index]

# View -> (direction the camera looks along, image "up" vector) in model space. "top" looks
# down (+z is up), so it shows the chewing surfaces of the lower jaw and the gum side of the
# upper one. Top/bottom views are tilted so the tooth sides show too; the side views look
# slightly towards the chewing surfaces (their z is mirrored for the upper jaw).
_VIEW_CAMERAS = {
    "top":    ((0.0, -0.45, -1.0), (0.0, 1.0, 0.0)),
    "bottom": ((0.0, -0.45, 1.0), (0.0, 1.0, 0.0)),
    "front":  ((0.0, -1.0, -0.25), (0.0, 0.0, 1.0)),
    "left":   ((1.0, -0.2, -0.25), (0.0, 0.0, 1.0)),
    "right":  ((-1.0, -0.2, -0.25), (0.0, 0.0, 1.0)),
}

EXTRA_MAPS = ("depth", "normal", "edges")

# Bottom and top colour of the vertical gradient behind the arch.
BACKDROP = (np.array([0.12, 0.14, 0.17]), np.array([0.28, 0.31, 0.36]))


@dataclass(frozen=True)
class Ellipsoids:
    """K ellipsoids: centres [K,3], rotations [K,3,3] (columns = local axes), radii [K,3],
    labels [K] (tooth position or GUM_LABEL)."""

    centres: np.ndarray
    rotations: np.ndarray
    radii: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Scene:
    """One arch seen from one view, plus the look of its render."""

    jaw: str
    view: str
    solids: Ellipsoids
    occlusal_sign: float  # +1: crowns point to +z (lower jaw), -1: upper jaw
    direction: np.ndarray  # unit vector the camera looks along
    right: np.ndarray  # image x axis
    up: np.ndarray  # image y axis
    centre: np.ndarray  # model point at the image centre
    half_extent: float  # half the image width, in model units
    light: np.ndarray  # unit vector towards the light
    tooth_tint: np.ndarray  # [NUM_TEETH, 3] enamel albedo per tooth
    gum_albedo: np.ndarray  # [3]
    texture_seed: int  # seeds the surface grain
    view_detail: tuple[str, ...] = ()  # detail words of a compound view, e.g. ("top", "left")


@dataclass(frozen=True)
class SampleKey:
    """A maps-layout sample: its file name (no map kind) and the jaw, view and detail it shows."""

    name: str
    jaw: str
    view: str
    view_detail: tuple[str, ...]


def sample_key(seed: int, index: int) -> SampleKey:
    """The maps-layout name of sample `index`, unique per (seed, index).

    Ids take three shapes in turn: 8 hex digits (a bijection of the index), `patient<index>`
    and a surname followed by the index as a trailing number.
    """
    rng = np.random.default_rng([seed, index, _NAME_STREAM])
    jaw, view = jaw_view_for_index(index)
    choices = VIEW_DETAILS[view]
    detail = choices[rng.integers(len(choices))]
    tail = TAILS[rng.integers(len(TAILS))]
    words = "_".join((view,) + detail)
    style = index % 3
    if style == 0:
        name = f"{jaw}_{(index * 0x9E3779B1 + (seed + 1) * 0x5BD1E995) % 2**32:08X}_{words}{tail}"
    elif style == 1:
        name = f"{jaw}_patient{index}_{words}{tail}"
    else:
        name = f"{jaw}_{SURNAMES[rng.integers(len(SURNAMES))]}_{words}_{index}"
    return SampleKey(name + ".png", jaw, view, detail)


def jaw_view_for_index(index: int) -> tuple[str, str]:
    """Round-robin over the 10 jaw/view combinations, so every split is balanced."""
    combo = index % (len(JAWS) * len(VIEWS))
    return JAWS[combo // len(VIEWS)], VIEWS[combo % len(VIEWS)]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix about `axis` by `angle` radians (Rodrigues)."""
    x, y, z = _unit(np.asarray(axis, dtype=np.float64))
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _arch_positions(rng: np.random.Generator, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tooth centres (x, y) and unit tangents along one side (x >= 0) of a U-shaped arch.

    The arch is half an ellipse, x = a cos(phi), y = b sin(phi), walked from the midline
    (phi = 90 degrees) backwards, widening slightly towards the molars; teeth sit side
    by side by arc length.
    """
    half_width = rng.uniform(0.22, 0.27)
    depth = rng.uniform(0.38, 0.48)
    flare = rng.uniform(0.05, 0.25)
    phi = np.linspace(np.pi / 2, -np.pi / 3, 2000)
    xs = half_width * np.cos(phi) * (1.0 + flare * (1.0 - np.sin(phi)) / 2)
    ys = depth * np.sin(phi)
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(xs), np.diff(ys)))])
    middles = np.cumsum(widths) - widths / 2
    x, y = np.interp(middles, arc, xs), np.interp(middles, arc, ys)
    tangent = _unit(np.stack([np.interp(middles, arc, np.gradient(xs)), np.interp(middles, arc, np.gradient(ys))], 1))
    return np.stack([x, y], axis=1), tangent


def _build_arch(rng: np.random.Generator, occlusal_sign: float) -> Ellipsoids:
    """Teeth, cusps and gum ellipsoids of one arch with random proportions and small misalignments."""
    scale = rng.uniform(0.9, 1.1)
    sizes = np.array([t[1:4] for t in TOOTH_TYPES]) * scale
    positions, tangents = _arch_positions(rng, sizes[:, 0])
    centres, rotations, radii, labels = [], [], [], []

    def add(centre, rotation, radius, label):
        centres.append(centre)
        rotations.append(rotation)
        radii.append(radius)
        labels.append(label)

    for side in (-1.0, 1.0):
        for k, (_, _, _, _, cusps) in enumerate(TOOTH_TYPES):
            # position 0 = right second molar ... 13 = left second molar
            label = TEETH_PER_SIDE - 1 - k if side < 0 else TEETH_PER_SIDE + k
            if rng.random() < 0.04:  # a missing tooth now and then
                continue
            width, depth, height = sizes[k] * rng.uniform(0.93, 1.07, size=3)
            (x, y), (tx, ty) = positions[k], tangents[k]
            tangent = np.array([side * tx, ty, 0.0])
            outward = np.array([-ty, side * tx, 0.0]) * side  # away from the arch centre
            up = np.array([0.0, 0.0, occlusal_sign])
            base = np.stack([tangent, outward, up], axis=1)
            tilt = _rotation(rng.normal(size=3), rng.normal(0.0, 0.06))
            rotation = tilt @ base
            crown = np.array([side * x, y, 0.0]) + rng.normal(0.0, 0.004, size=3) * [1, 1, 0]
            add(crown + up * height * 0.5, rotation, np.array([width * 0.53, depth * 0.5, height * 0.5]), label)
            for c in range(cusps):  # bumps on the chewing surface
                du = (c % 2 - 0.5) * width * (0.45 if cusps == 4 else 0.0)
                dv = (c // 2 - 0.5) * depth * 0.45 if cusps == 4 else (c - 0.5) * depth * 0.45
                offset = rotation @ np.array([du, dv, height * 0.32])
                add(crown + offset, rotation, np.array([width * 0.26, depth * 0.24, height * 0.2]), label)
            gum_centre = crown - up * 0.018 - outward * depth * 0.05
            add(gum_centre, base, np.array([width * 0.75, depth * 0.62, 0.045]), GUM_LABEL)
    return Ellipsoids(np.array(centres), np.array(rotations), np.array(radii), np.array(labels))


def _turn_towards(direction: np.ndarray, up_hint: np.ndarray, words: tuple[str, ...]) -> np.ndarray:
    """`direction` with the camera moved towards the image sides named by `words` (DETAIL_SIDES)."""
    right = _unit(np.cross(direction, up_hint))
    up = np.cross(right, direction)
    offset = np.zeros(3)
    for previous, word in zip(("",) + words, words):
        if word in DETAIL_SIDES:
            degrees = DETAIL_TILT_DEG * (0.5 if previous == "slightly" else 1.0)
            side_x, side_y = DETAIL_SIDES[word]
            offset += np.tan(np.deg2rad(degrees)) * (side_x * right + side_y * up)
    return _unit(direction - offset)


def make_scene(seed: int, index: int, jaw: str | None = None, view: str | None = None,
               view_detail: tuple[str, ...] = ()) -> Scene:
    """The random scene of sample `index` (jaw and view round-robin unless given).

    `view_detail` turns the camera (see DETAIL_SIDES) without drawing random numbers, so
    the arch, light and look are those of the plain view.
    """
    rng = np.random.default_rng([seed, index])
    default_jaw, default_view = jaw_view_for_index(index)
    jaw, view = jaw or default_jaw, view or default_view
    if jaw not in JAWS or view not in VIEWS:
        raise ValueError(f"jaw/view: expected one of {JAWS} / {VIEWS}, got {jaw!r} / {view!r}")
    unknown = [w for w in view_detail if w not in DETAIL_SIDES and w != "slightly"]
    if unknown:
        raise ValueError(f"view_detail: unknown words {unknown}; valid: {sorted(DETAIL_SIDES)} and 'slightly'")
    sign = 1.0 if jaw == "lower" else -1.0
    solids = _build_arch(rng, sign)

    look, up_hint = (np.array(v, dtype=np.float64) for v in _VIEW_CAMERAS[view])
    if view in ("front", "left", "right"):
        look[2] *= sign  # look slightly towards the chewing surfaces
    jitter = _rotation(rng.normal(size=3), np.deg2rad(rng.uniform(0.0, 10.0)))
    direction = _unit(jitter @ look)
    if view_detail:
        direction = _turn_towards(direction, jitter @ up_hint, view_detail)
    right = _unit(np.cross(direction, jitter @ up_hint))
    up = np.cross(right, direction)

    # frame the arch: the extent of each ellipsoid along an axis a is |diag(r) R^T a|
    def extent(axis: np.ndarray) -> tuple[float, float]:
        centre = solids.centres @ axis
        reach = np.linalg.norm(solids.radii * np.einsum("kij,i->kj", solids.rotations, axis), axis=1)
        return float((centre - reach).min()), float((centre + reach).max())

    (x0, x1), (y0, y1) = extent(right), extent(up)
    half_extent = 0.5 * max(x1 - x0, y1 - y0) * rng.uniform(1.08, 1.2)
    shift = rng.uniform(-0.04, 0.04, size=2) * half_extent
    centre = right * ((x0 + x1) / 2 + shift[0]) + up * ((y0 + y1) / 2 + shift[1])

    light = _unit(-direction + right * rng.uniform(-1.2, 1.2) + up * rng.uniform(-1.0, 1.2))
    enamel = np.array([0.93, 0.89, 0.80]) * rng.uniform(0.92, 1.02) + rng.normal(0.0, 0.015, size=3)
    tooth_tint = np.clip(enamel + rng.normal(0.0, 0.025, size=(NUM_TEETH, 3)), 0.0, 1.0)
    gum = np.clip(np.array([0.80, 0.40, 0.44]) + rng.normal(0.0, 0.04, size=3), 0.0, 1.0)
    return Scene(jaw, view, solids, sign, direction, right, up, centre, half_extent,
                 light, tooth_tint, gum, int(rng.integers(2**31)), tuple(view_detail))


def _cast(origins: np.ndarray, direction: np.ndarray, solids: Ellipsoids) -> tuple[np.ndarray, np.ndarray]:
    """Cast parallel rays from `origins` [P,3] along `direction`.

    Returns the distance to the first surface hit [P] (inf: no hit) and the index of
    the ellipsoid hit [P] (-1: none). Each ellipsoid is only tested against the rays
    inside its bounding box as seen along `direction`.
    """
    u = _unit(np.cross(direction, [0.0, 0.0, 1.0] if abs(direction[2]) < 0.9 else [1.0, 0.0, 0.0]))
    v = np.cross(direction, u)
    ou, ov = origins @ u, origins @ v
    best_t = np.full(len(origins), np.inf)
    best_k = np.full(len(origins), -1)
    for k, (centre, rotation, radii) in enumerate(zip(solids.centres, solids.rotations, solids.radii)):
        reach_u, reach_v = np.linalg.norm(radii * (rotation.T @ u)), np.linalg.norm(radii * (rotation.T @ v))
        rays = np.nonzero((np.abs(ou - centre @ u) <= reach_u) & (np.abs(ov - centre @ v) <= reach_v))[0]
        if len(rays) == 0:
            continue
        # in the ellipsoid's unit-sphere coordinates: |o + t d|^2 = 1
        o = (origins[rays] - centre) @ rotation / radii
        d = direction @ rotation / radii
        a, b, c = d @ d, 2.0 * (o @ d), (o * o).sum(axis=1) - 1.0
        disc = b * b - 4.0 * a * c
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
        closer = (disc > 0) & (t > 1e-6) & (t < best_t[rays])
        best_t[rays[closer]] = t[closer]
        best_k[rays[closer]] = k
    return best_t, best_k


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random grid of `cells` x `cells` upsampled bicubically."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Box filter [H*f, W*f, C] -> [H, W, C]."""
    h, w = image.shape[0] // factor, image.shape[1] // factor
    return image.reshape(h, factor, w, factor, -1).mean(axis=(1, 3))


def render(scene: Scene, size: int = 64, supersample: int = 2) -> dict[str, np.ndarray]:
    """Render all maps of `scene` at size x size (float32 HWC in [0, 1]) plus `labels` [H, W] (int)."""
    n = size * supersample
    rng = np.random.default_rng(scene.texture_seed)
    coords = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    px, py = np.meshgrid(coords * scene.half_extent, -coords * scene.half_extent)
    origins = (scene.centre + px[..., None] * scene.right + py[..., None] * scene.up - 10.0 * scene.direction)
    origins = origins.reshape(-1, 3)

    t, nearest = _cast(origins, scene.direction, scene.solids)
    hit = nearest >= 0
    labels = np.where(hit, scene.solids.labels[nearest], BACKGROUND_LABEL)

    # surface normals from the local coordinates of the hit on its ellipsoid
    points = origins + np.where(hit, t, 0.0)[:, None] * scene.direction
    rot, rad = scene.solids.rotations[nearest], scene.solids.radii[nearest]
    local = np.einsum("pi,pij->pj", points - scene.solids.centres[nearest], rot) / rad
    normals = _unit(np.einsum("pij,pj->pi", rot, local / rad))

    _, blocker = _cast(points + normals * 1e-4, scene.light, scene.solids)
    lit = (blocker < 0) & hit
    diffuse = np.clip(normals @ scene.light, 0.0, 1.0) * lit
    lighting = np.where(hit, diffuse, 0.0)

    is_tooth = hit & (labels != GUM_LABEL)
    crown = np.clip(points[:, 2] * scene.occlusal_sign / 0.1, 0.0, 1.0)  # 0 at the gum line, 1 at the tip
    albedo = np.where(is_tooth[:, None], scene.tooth_tint[np.clip(labels, 0, NUM_TEETH - 1)], scene.gum_albedo)
    albedo = albedo * np.where(is_tooth, 0.88 + 0.12 * crown, 1.0)[:, None]  # yellower near the gums
    albedo = albedo + np.where(is_tooth, 0.05 * crown ** 3, 0.0)[:, None] * [-0.3, 0.0, 0.6]  # translucent tip
    grain = _value_noise(rng, n, max(4, n // 6)).reshape(-1)
    albedo = albedo * np.where(is_tooth, 0.97 + 0.06 * grain, 0.8 + 0.35 * grain)[:, None]
    half = _unit(scene.light - scene.direction)
    shininess = np.where(is_tooth, 60.0, 18.0)
    specular = np.where(is_tooth, 0.55, 0.25) * np.clip(normals @ half, 0.0, 1.0) ** shininess * lit
    shaded = albedo * (0.22 + 0.78 * diffuse[:, None]) + specular[:, None]
    backdrop_mix = np.repeat(np.linspace(1.0, 0.0, n), n)[:, None]
    bottom, top = BACKDROP
    target = np.where(hit[:, None], shaded, bottom + (top - bottom) * backdrop_mix)

    seg_colours = np.concatenate([TOOTH_COLOURS, GUM_COLOUR[None], np.zeros((1, 3), np.float32)])
    seg = seg_colours[labels]  # label -1 picks the black row

    depth_along = np.where(hit, t, np.nan)
    near, far = np.nanmin(depth_along, initial=np.inf), np.nanmax(depth_along, initial=-np.inf)
    depth = np.where(hit, 1.0 - 0.8 * (depth_along - near) / max(far - near, 1e-6), 0.0)
    camera_normals = np.stack([normals @ scene.right, normals @ scene.up, -(normals @ scene.direction)], axis=1)
    normal = np.where(hit[:, None], (camera_normals + 1.0) / 2.0, 0.0)

    grid_labels = labels.reshape(n, n)
    grid_depth = np.where(hit, t, 1e3).reshape(n, n)
    edges = np.zeros((n, n), dtype=bool)
    for axis in (0, 1):
        changed = (np.diff(grid_labels, axis=axis) != 0) | (np.abs(np.diff(grid_depth, axis=axis)) > 0.02)
        pad = [(0, 1), (0, 0)] if axis == 0 else [(0, 0), (0, 1)]
        edges |= np.pad(changed, pad)

    def finish(image: np.ndarray, channels: int) -> np.ndarray:
        return np.clip(_downsample(image.reshape(n, n, channels), supersample), 0.0, 1.0).astype(np.float32)

    centre_pixel = supersample // 2
    return {
        "lighting": finish(lighting, 1),
        "seg": seg.reshape(n, n, 3)[centre_pixel::supersample, centre_pixel::supersample].astype(np.float32),
        "target": finish(target, 3),
        "depth": finish(depth, 1),
        "normal": finish(normal, 3),
        "edges": finish(edges.astype(np.float64), 1),
        "labels": grid_labels[centre_pixel::supersample, centre_pixel::supersample].astype(np.int64),
    }


def segmentation_map(labels: np.ndarray) -> np.ndarray:
    """The user's kind of segmentation map of `labels` [H, W]: flat SEG_PALETTE colours, float32 HWC."""
    palette = np.array([SEG_PALETTE["teeth"], SEG_PALETTE["gum"], SEG_PALETTE["background"]], np.float32) / 255.0
    region = np.where(labels == BACKGROUND_LABEL, 2, np.where(labels == GUM_LABEL, 1, 0))
    return palette[region]


def _save_png(image: np.ndarray, path: Path) -> None:
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)


def _check_extra_maps(extra_maps: tuple[str, ...]) -> None:
    unknown = set(extra_maps) - set(EXTRA_MAPS)
    if unknown:
        raise ValueError(f"extra_maps: unknown {sorted(unknown)}; valid: {EXTRA_MAPS}")


def write_maps_dataset(out_dir: str | os.PathLike, count: int, seed: int = 0, size: int = 64, start: int = 0,
                       extra_maps: tuple[str, ...] = ()) -> list[SampleKey]:
    """Write samples start..start+count-1 in the maps layout into `out_dir`; return their keys.

    Folders: lighting/ (grey RGB), segmentation/ (flat SEG_PALETTE colours), target/, and one
    folder per name in `extra_maps` (depth, normal, edges); every file is named by the
    sample's key (`sample_key`), and the camera follows the key's view detail.
    """
    _check_extra_maps(extra_maps)
    root = Path(out_dir)
    for folder in MAP_FOLDERS + tuple(extra_maps):
        (root / folder).mkdir(parents=True, exist_ok=True)
    keys = []
    for index in range(start, start + count):
        key = sample_key(seed, index)
        maps = render(make_scene(seed, index, view_detail=key.view_detail), size)
        maps["lighting"] = np.repeat(maps["lighting"], 3, axis=2)
        maps["segmentation"] = segmentation_map(maps["labels"])
        for folder in MAP_FOLDERS + tuple(extra_maps):
            _save_png(maps[folder], root / folder / key.name)
        keys.append(key)
    return keys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--start", type=int, default=0, help="index of the first sample")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-maps", nargs="*", default=[], choices=EXTRA_MAPS)
    args = parser.parse_args(argv)
    keys = write_maps_dataset(args.out, args.count, args.seed, args.size, args.start, tuple(args.extra_maps))
    print(f"wrote {len(keys)} samples to {args.out}")


if __name__ == "__main__":
    main()
