"""Tests for ctrlora_core.conditions: dental blend, range checks, image I/O and layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ctrlora_core.conditions import (
    BLEND_MODES,
    DENTAL_PALETTE,
    SEG_TOLERANCE,
    ConditionError,
    blend_lighting_seg,
    check_unit_range,
    flatten_alpha,
    load_image,
    load_map,
    region_masks,
    tensor_to_image,
)

# One pixel, three channels: (l, s) = (0.2, 0.6), (0.8, 0.3), (0.5, 0.25).
LIGHTING = np.array([[[0.2, 0.8, 0.5]]], dtype=np.float64)
SEG = np.array([[[0.6, 0.3, 0.25]]], dtype=np.float64)

# f_mode(l, s) worked out by hand for the three channels above.
HAND_BLENDS = {
    # f = s
    "alpha": [0.6, 0.3, 0.25],
    # f = l * s
    "multiply": [0.12, 0.24, 0.125],
    # f = 1 - (1 - l)(1 - s): 1 - 0.8*0.4, 1 - 0.2*0.7, 1 - 0.5*0.75
    "screen": [0.68, 0.86, 0.625],
    # l < 0.5: 2ls = 2*0.2*0.6; l >= 0.5: 1 - 2(1-l)(1-s) = 1 - 2*0.2*0.7, 1 - 2*0.5*0.75.
    # (Switching on s instead of l would give 0.36 and 0.48 for the first two.)
    "overlay": [0.24, 0.72, 0.25],
    # pegtop f = (1 - 2s) l^2 + 2sl: -0.2*0.04 + 0.24, 0.4*0.64 + 0.48, 0.5*0.25 + 0.25.
    # (The W3C formula would give 0.2496 for the first channel.)
    "soft_light": [0.232, 0.736, 0.375],
}


def random_pair(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)


def test_blend_modes_are_exported_in_order():
    assert BLEND_MODES == ("alpha", "multiply", "screen", "overlay", "soft_light")
    assert set(HAND_BLENDS) == set(BLEND_MODES)


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_full_blend_matches_hand_values(mode):
    result = blend_lighting_seg(LIGHTING, SEG, alpha=1.0, mode=mode)
    np.testing.assert_allclose(result[0, 0], HAND_BLENDS[mode], atol=1e-12)


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_half_alpha_mixes_lighting_and_hand_blend(mode):
    result = blend_lighting_seg(LIGHTING, SEG, alpha=0.5, mode=mode)
    expected = 0.5 * LIGHTING[0, 0] + 0.5 * np.array(HAND_BLENDS[mode])
    np.testing.assert_allclose(result[0, 0], expected, atol=1e-12)


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_alpha_zero_returns_lighting_exactly(mode):
    lighting, seg = random_pair((2, 8, 8, 3))
    assert torch.equal(blend_lighting_seg(lighting, seg, alpha=0.0, mode=mode), lighting)


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_result_is_linear_in_alpha(mode):
    lighting, seg = random_pair((8, 8, 3))
    full = blend_lighting_seg(lighting, seg, alpha=1.0, mode=mode)
    quarter = blend_lighting_seg(lighting, seg, alpha=0.25, mode=mode)
    torch.testing.assert_close(quarter, 0.75 * lighting + 0.25 * full)


def test_alpha_one_multiply_is_product():
    lighting, seg = random_pair((1, 16, 16, 3))
    assert torch.equal(blend_lighting_seg(lighting, seg, alpha=1.0, mode="multiply"), lighting * seg)


def test_result_is_clamped_to_unit_range():
    lighting = torch.full((2, 2, 3), 1.0005)  # within the tolerance, so accepted
    seg = torch.full((2, 2, 3), 1.0005)
    result = blend_lighting_seg(lighting, seg, alpha=1.0, mode="alpha")
    assert torch.equal(result, torch.ones(2, 2, 3))


def test_numpy_and_torch_layouts_agree():
    lighting, seg = random_pair((2, 4, 5, 3))
    batched = blend_lighting_seg(lighting, seg, alpha=0.7, mode="overlay")
    assert isinstance(batched, torch.Tensor) and batched.shape == (2, 4, 5, 3)
    for i in range(2):
        single = blend_lighting_seg(lighting[i], seg[i], alpha=0.7, mode="overlay")
        as_numpy = blend_lighting_seg(lighting[i].numpy(), seg[i].numpy(), alpha=0.7, mode="overlay")
        assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
        assert torch.equal(single, batched[i])
        np.testing.assert_array_equal(as_numpy, batched[i].numpy())


def test_batch_of_one_broadcasts():
    lighting, seg = random_pair((3, 4, 4, 3))
    result = blend_lighting_seg(lighting, seg[:1], alpha=0.5, mode="screen")
    assert result.shape == (3, 4, 4, 3)
    assert torch.equal(result[2], blend_lighting_seg(lighting[2], seg[0], alpha=0.5, mode="screen"))


def test_grayscale_broadcasts_and_rgba_alpha_is_dropped():
    lighting, seg = random_pair((4, 4, 3))
    gray = lighting[..., :1]
    rgba = torch.cat([seg, torch.zeros(4, 4, 1)], dim=-1)
    result = blend_lighting_seg(gray, rgba, alpha=0.5, mode="multiply")
    expected = blend_lighting_seg(gray.expand(4, 4, 3).clone(), seg, alpha=0.5, mode="multiply")
    assert result.shape == (4, 4, 3)
    assert torch.equal(result, expected)


def test_size_mismatch_names_both_shapes():
    with pytest.raises(ConditionError, match=r"lighting \(8, 8, 3\) vs seg \(8, 6, 3\)"):
        blend_lighting_seg(torch.zeros(8, 8, 3), torch.zeros(8, 6, 3))


def test_batch_mismatch_and_rank_mismatch_are_rejected():
    with pytest.raises(ConditionError, match=r"lighting \(2, 4, 4, 3\) vs seg \(3, 4, 4, 3\)"):
        blend_lighting_seg(torch.zeros(2, 4, 4, 3), torch.zeros(3, 4, 4, 3))
    with pytest.raises(ConditionError, match=r"lighting \(4, 4, 3\) vs seg \(1, 4, 4, 3\)"):
        blend_lighting_seg(torch.zeros(4, 4, 3), torch.zeros(1, 4, 4, 3))


def test_bad_mode_lists_valid_modes():
    with pytest.raises(ConditionError, match="'darken'.*alpha, multiply, screen, overlay, soft_light"):
        blend_lighting_seg(torch.zeros(2, 2, 3), torch.zeros(2, 2, 3), mode="darken")


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_bad_alpha_is_rejected(alpha):
    with pytest.raises(ConditionError, match="alpha: must be in \\[0, 1\\]"):
        blend_lighting_seg(torch.zeros(2, 2, 3), torch.zeros(2, 2, 3), alpha=alpha)


def test_out_of_range_input_names_image_and_extremes():
    seg = torch.zeros(2, 2, 3)
    seg[0, 0, 0] = 1.25
    with pytest.raises(ConditionError, match=r"seg: values must be in \[0, 1\], got min 0, max 1.25"):
        blend_lighting_seg(torch.zeros(2, 2, 3), seg)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((2, 2, 3), dtype=np.uint8), "lighting: expected a float image"),
        (np.zeros((2, 2, 2), dtype=np.float32), "lighting: expected 1, 3 or 4 channels"),
        (np.zeros((2, 3), dtype=np.float32), r"lighting: expected shape \[H, W, C\]"),
        ([[0.0]], "lighting: expected a numpy array or torch tensor, got list"),
    ],
)
def test_bad_image_kinds_are_rejected(image, message):
    with pytest.raises(ConditionError, match=message):
        blend_lighting_seg(image, np.zeros((2, 2, 3), dtype=np.float32))


def test_check_unit_range_tolerance_and_messages():
    check_unit_range(np.array([-0.0005, 1.0005]), "ok")
    with pytest.raises(ConditionError, match=r"cond: values must be in \[0, 1\], got min -0.5, max 0.5"):
        check_unit_range(torch.tensor([-0.5, 0.5]), "cond")
    with pytest.raises(ConditionError, match="cond: contains NaN"):
        check_unit_range(np.array([0.5, np.nan]), "cond")
    with pytest.raises(ConditionError):
        check_unit_range(np.array([1.002]), "cond")
    assert isinstance(ConditionError("x"), ValueError)


def save_png(path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def test_load_image_rgb_gray_and_rgba(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4
    save_png(tmp_path / "rgb.png", rgb)
    loaded = load_image(tmp_path / "rgb.png")
    assert loaded.dtype == np.float32 and loaded.shape == (4, 5, 3)
    np.testing.assert_array_equal(loaded, rgb.astype(np.float32) / 255.0)

    gray = np.array([[0, 51], [102, 255]], dtype=np.uint8)
    save_png(tmp_path / "gray.png", gray)
    expected_gray = np.repeat(gray[..., None], 3, axis=2).astype(np.float32) / 255.0
    np.testing.assert_array_equal(load_image(tmp_path / "gray.png"), expected_gray)

    rgba = np.concatenate([rgb, np.zeros((4, 5, 1), dtype=np.uint8)], axis=2)
    save_png(tmp_path / "rgba.png", rgba)
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), loaded)


def test_load_image_sixteen_bit_gray(tmp_path):
    gray16 = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    save_png(tmp_path / "gray16.png", gray16)
    loaded = load_image(tmp_path / "gray16.png")
    assert loaded.shape == (2, 2, 3)
    np.testing.assert_allclose(loaded[..., 1], gray16 / 65535.0, rtol=1e-6)


def test_load_image_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(ConditionError, match="broken.png: cannot read image"):
        load_image(broken)
    with pytest.raises(ConditionError, match="missing.png: cannot read image"):
        load_image(tmp_path / "missing.png")


def test_conversion_errors():
    with pytest.raises(ConditionError, match=r"tensor: values must be in \[0, 1\], got min -1"):
        tensor_to_image(torch.full((1, 2, 2, 3), -1.0))
    with pytest.raises(ConditionError, match="tensor: expected a 4-D BHWC tensor"):
        tensor_to_image(torch.zeros(2, 2, 3))
    with pytest.raises(ConditionError, match="layout: expected 'BHWC' or 'BCHW', got 'HWC'"):
        tensor_to_image(torch.zeros(1, 2, 2, 3), layout="HWC")


def test_dental_palette():
    assert DENTAL_PALETTE == {"teeth": (196, 196, 116), "gum": (204, 68, 44), "background": (56, 56, 56)}


def test_region_masks_take_the_nearest_colour_within_the_tolerance():
    teeth, gum, background = (np.array(c, dtype=np.float64) for c in DENTAL_PALETTE.values())
    pixels = [
        teeth, gum, background,  # exact colours
        teeth + [20, -20, 15],  # 32 away from teeth: still teeth
        teeth + [0, 0, 40], teeth + [0, 0, 41],  # exactly at the tolerance (in), just beyond (out)
        (teeth + gum) / 2,  # an anti-aliased edge pixel: about 74 from both, in no region
        [255, 255, 255],  # far from everything
    ]
    seg = (np.array(pixels, dtype=np.float32) / 255.0)[None]  # [1, 8, 3]
    masks = region_masks(seg)
    assert list(masks) == ["teeth", "gum", "background"] and masks["teeth"].dtype == bool
    assert masks["teeth"][0].tolist() == [True, False, False, True, True, False, False, False]
    assert masks["gum"][0].tolist() == [False, True, False, False, False, False, False, False]
    assert masks["background"][0].tolist() == [False, False, True, False, False, False, False, False]
    assert SEG_TOLERANCE == 40.0
    wide = region_masks(seg, tolerance=80.0)
    assert wide["teeth"][0, 5] and (wide["teeth"][0, 6] or wide["gum"][0, 6])
    torch_masks = region_masks(torch.from_numpy(seg))
    assert all(torch.equal(torch_masks[k], torch.from_numpy(masks[k])) for k in masks)


def test_region_masks_with_another_palette():
    seg = np.zeros((2, 2, 3), np.float32)
    seg[0, 0] = [1.0, 0.0, 0.0]
    masks = region_masks(seg, {"enamel": (255, 0, 0), "rest": (0, 0, 0)}, tolerance=1.0)
    assert masks["enamel"].tolist() == [[True, False], [False, False]]
    assert masks["rest"].sum() == 3
    with pytest.raises(ConditionError, match="palette: no colours"):
        region_masks(seg, {})


def test_flatten_alpha_composites_over_a_colour():
    image = np.full((2, 2, 3), 0.8, np.float32)
    transparency = np.array([[0.0, 1.0], [0.25, 0.5]], np.float32)
    flat = flatten_alpha(image, transparency, (0, 0, 255))
    assert flat.dtype == np.float32
    np.testing.assert_allclose(flat[0, 0], [0.8, 0.8, 0.8])
    np.testing.assert_allclose(flat[0, 1], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(flat[1, 0], [0.6, 0.6, 0.85], rtol=1e-6)
    batch = flatten_alpha(torch.from_numpy(image)[None], torch.from_numpy(transparency)[None], (0, 0, 255))
    assert torch.equal(batch[0], torch.from_numpy(flat))
    with pytest.raises(ConditionError, match=r"transparency mask \(3, 3\) does not match the image \(2, 2, 3\)"):
        flatten_alpha(image, np.zeros((3, 3), np.float32), (0, 0, 0))
    with pytest.raises(ConditionError, match="transparency mask: values must be in"):
        flatten_alpha(image, transparency * 2, (0, 0, 0))


def test_load_map_flattens_transparent_files_as_load_image_reads_them(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = [[0, 64, 128, 255]] * 4
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    flat = load_map(tmp_path / "a.png", (56, 56, 56))
    transparency = 1.0 - rgba[..., 3].astype(np.float32) / 255.0
    expected = (np.float32(200 / 255) * (1 - transparency) + np.float32(56 / 255) * transparency)
    np.testing.assert_allclose(flat[..., 0], expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), np.full((4, 4, 3), np.float32(200) / 255))
    # a palette file with a transparent index is transparent there, an opaque file is returned as it is
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    palette.save(tmp_path / "p.png", transparency=1)
    np.testing.assert_array_equal(load_map(tmp_path / "p.png", (0, 0, 255))[0], [[1, 0, 0], [0, 0, 1]])
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.png")
    assert np.array_equal(load_map(tmp_path / "rgb.png", (56, 56, 56)), load_image(tmp_path / "rgb.png"))
