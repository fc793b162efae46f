"""The live preview's blend (web/lib/blend.js, run under Node.js) matches
ctrlora_core.conditions.blend_lighting_seg: same modes, same floats, same bytes."""
from __future__ import annotations

import base64
import math

import numpy as np
import pytest
import torch

from ctrlora_core.conditions import (
    BLEND_MODES,
    DENTAL_PALETTE,
    ConditionError,
    blend_lighting_seg,
    flatten_alpha,
    tensor_to_image,
)
from node_js import requires_node, run_js

pytestmark = requires_node

ALPHAS = (0.0, 0.01, 0.3, 0.5, 0.77, 1.0)


def _every_byte_pair() -> tuple[np.ndarray, np.ndarray]:
    """RGBA uint8 images [256, 256, 4]: the red channels hold every (lighting, seg) byte pair once.

    The alpha bytes are random: both blends must ignore them.
    """
    rng = np.random.default_rng(0)
    l, s = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    noise = rng.integers(0, 256, size=(256, 256))
    lighting = np.stack([l, 255 - l, (l * 7 + s) % 256, noise], axis=-1).astype(np.uint8)
    seg = np.stack([s, (s * 3) % 256, 255 - s, noise[::-1]], axis=-1).astype(np.uint8)
    return lighting, seg


def _js_blend_bytes(lighting: np.ndarray, seg: np.ndarray) -> dict[tuple[str, float], np.ndarray]:
    data = {"lighting": base64.b64encode(lighting.tobytes()).decode(),
            "seg": base64.b64encode(seg.tobytes()).decode(), "modes": list(BLEND_MODES), "alphas": ALPHAS}
    out = run_js("blend.js", """
        const l = new Uint8ClampedArray(Buffer.from(data.lighting, "base64"));
        const s = new Uint8ClampedArray(Buffer.from(data.seg, "base64"));
        const out = {};
        for (const mode of data.modes) for (const alpha of data.alphas)
          out[`${mode} ${alpha}`] = Buffer.from(lib.blendRGBA(l, s, alpha, mode)).toString("base64");
        return out;
    """, data)
    return {(mode, alpha): np.frombuffer(base64.b64decode(out[f"{mode} {alpha:g}"]), np.uint8).reshape(lighting.shape)
            for mode in BLEND_MODES for alpha in ALPHAS}


def test_js_lists_the_same_modes():
    assert run_js("blend.js", "return lib.BLEND_MODES;", None) == list(BLEND_MODES)


def test_float_formulas_match():
    rng = np.random.default_rng(1)
    l = np.concatenate([rng.random(200), [0.0, 0.5, 0.5 - 1e-9, 1.0, 1.0]])
    s = np.concatenate([rng.random(200), [1.0, 0.25, 0.75, 0.0, 1.0]])
    cases = [(mode, alpha) for mode in BLEND_MODES for alpha in ALPHAS]
    got = run_js("blend.js", """
        return data.cases.map(([mode, alpha]) => data.l.map((l, i) => lib.blendValue(l, data.s[i], alpha, mode)));
    """, {"l": l.tolist(), "s": s.tolist(), "cases": cases})
    for (mode, alpha), values in zip(cases, got):
        expected = blend_lighting_seg(l[:, None, None], s[:, None, None], alpha, mode)[:, 0, 0]  # float64, 1 channel
        np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12, err_msg=f"{mode} alpha={alpha}")


def test_bytes_match_for_every_byte_pair():
    """JS bytes == numpy round-half-even of the Python float64 blend, for all 65536 (l, s) pairs."""
    lighting, seg = _every_byte_pair()
    js = _js_blend_bytes(lighting, seg)
    for (mode, alpha), got in js.items():
        expected = blend_lighting_seg(lighting / 255.0, seg / 255.0, alpha, mode)
        expected = np.round(expected * 255.0).astype(np.uint8)
        mismatches = int((got[..., :3] != expected).sum())
        assert mismatches == 0, f"{mode} alpha={alpha}: {mismatches} channel values differ"
        assert (got[..., 3] == 255).all()


def test_bytes_within_one_of_the_comfyui_float32_path():
    """ComfyUI feeds float32 images (LoadImage) and the core rounds with tensor_to_image."""
    lighting, seg = _every_byte_pair()
    js = _js_blend_bytes(lighting, seg)
    l32 = torch.from_numpy(lighting.astype(np.float32) / 255.0)[None]
    s32 = torch.from_numpy(seg.astype(np.float32) / 255.0)[None]
    for (mode, alpha), got in js.items():
        expected = tensor_to_image(blend_lighting_seg(l32, s32, alpha, mode))[0]
        worst = int(np.abs(got[..., :3].astype(int) - expected.astype(int)).max())
        assert worst <= 1, f"{mode} alpha={alpha}: off by {worst}"


@pytest.mark.parametrize("alpha, mode", [(0.5, "hard_light"), (0.5, "Alpha"), (-0.01, "alpha"), (1.5, "screen"),
                                         (math.nan, "overlay")])
def test_invalid_arguments_are_refused_on_both_sides(alpha, mode):
    with pytest.raises(ConditionError):
        blend_lighting_seg(np.zeros((1, 1, 3)), np.zeros((1, 1, 3)), alpha, mode)
    message = run_js("blend.js", """
        try { lib.blendValue(0.5, 0.5, Number(data.alpha), data.mode); return null; }
        catch (err) { return err.message; }
    """, {"alpha": str(alpha), "mode": mode})
    assert message and ("mode" in message if mode not in BLEND_MODES else "alpha" in message)


def test_flattening_colours_match_the_core():
    assert run_js("blend.js", "return lib.FLATTEN_COLOURS;", None) == {
        "lighting": [0, 0, 0], "segmentation": list(DENTAL_PALETTE["background"])}


def test_flattened_blend_bytes_match_the_core():
    """With mask inputs connected the preview flattens transparent maps as the node does."""
    lighting, seg = _every_byte_pair()  # random alpha bytes
    colours = {"lighting": (0, 0, 0), "segmentation": DENTAL_PALETTE["background"]}
    for flatten in ({"lighting": colours["lighting"]}, {"segmentation": colours["segmentation"]}, colours):
        data = {"lighting": base64.b64encode(lighting.tobytes()).decode(),
                "seg": base64.b64encode(seg.tobytes()).decode(), "flatten": flatten}
        out = run_js("blend.js", """
            const l = new Uint8ClampedArray(Buffer.from(data.lighting, "base64"));
            const s = new Uint8ClampedArray(Buffer.from(data.seg, "base64"));
            return Buffer.from(lib.blendRGBA(l, s, 0.3, "overlay", data.flatten)).toString("base64");
        """, data)
        got = np.frombuffer(base64.b64decode(out), np.uint8).reshape(lighting.shape)
        maps = []
        for name, image in (("lighting", lighting), ("segmentation", seg)):
            rgb = image[..., :3] / 255.0
            maps.append(flatten_alpha(rgb, 1.0 - image[..., 3] / 255.0, flatten[name]) if name in flatten else rgb)
        expected = np.round(blend_lighting_seg(*maps, 0.3, "overlay") * 255.0).astype(np.uint8)
        mismatches = int((got[..., :3] != expected).sum())
        assert mismatches == 0, f"{sorted(flatten)}: {mismatches} channel values differ"
        unflattened = np.round(blend_lighting_seg(lighting / 255.0, seg / 255.0, 0.3, "overlay") * 255.0)
        assert (unflattened[..., :3] != expected).mean() > 0.5  # the alpha bytes do change the result
