"""Validation and dental metrics on known images, the grid PNG, and train/evaluate.py."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ctrlora_core.formats import save_adapter
from ctrlora_core.random_weights import random_adapter
from train_data import one_thread, write_dental, write_maps  # noqa: F401
from train import evaluate
from train.backbones.tiny import TinyBackbone
from train.metrics import (
    boundary_f1,
    dental_metrics,
    edge_correlation,
    edge_map,
    hf_energy_ratio,
    masked_psnr,
    psnr,
    region_boundary,
    ssim,
)
from train.sampling import save_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def test_psnr_values():
    a = torch.zeros(2, 3, 8, 8)
    b = torch.full((2, 3, 8, 8), 0.1)
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0, 20.0]))
    assert psnr(a, a).tolist() == [100.0, 100.0]


def test_ssim_matches_the_closed_form_on_flat_images_and_drops_with_noise():
    a = torch.full((1, 3, 16, 16), 0.2)
    b = torch.full((1, 3, 16, 16), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)  # no variance: the luminance term only
    torch.testing.assert_close(ssim(a, b), torch.tensor([expected]), rtol=1e-3, atol=0)  # float32 variances
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert float(ssim(image, image)) == pytest.approx(1.0, abs=1e-5)
    noisy = (image + 0.1 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    noisier = (image + 0.3 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert 1.0 > float(ssim(image, noisy)) > float(ssim(image, noisier)) > 0.0


def test_edge_correlation():
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 8:24, 8:24] = 1.0
    moved = torch.roll(image, shifts=(9, 9), dims=(2, 3))
    assert float(edge_correlation(image, image)) == pytest.approx(1.0, abs=1e-5)
    assert float(edge_correlation(image, 0.5 * image + 0.2)) == pytest.approx(1.0, abs=1e-5)
    assert float(edge_correlation(image, moved)) < 0.3


def _teeth_over_gum(size=32, split=16):
    """Teeth (bright) in the columns left of `split`, gum (red) right of it: image [1, 3, H, W] and masks."""
    teeth = torch.zeros(1, size, size, dtype=torch.bool)
    teeth[:, :, :split] = True
    image = torch.where(teeth[:, None], torch.tensor([0.77, 0.77, 0.45])[None, :, None, None],
                        torch.tensor([0.8, 0.27, 0.17])[None, :, None, None])
    return image, teeth, ~teeth


def _box_blur(images, k):
    c = images.shape[1]
    padded = F.pad(images, (k // 2,) * 4, mode="replicate")
    return F.conv2d(padded, torch.ones(c, 1, k, k) / k**2, groups=c)


def test_region_boundary_is_both_sides_of_the_interface():
    _, teeth, gum = _teeth_over_gum(8, 4)
    boundary = region_boundary(teeth, gum)
    assert boundary[0].nonzero()[:, 1].unique().tolist() == [3, 4] and int(boundary.sum()) == 16
    assert not region_boundary(teeth, torch.zeros_like(gum)).any()


def test_edge_map_threshold_in_gradient_per_pixel():
    ramp = torch.linspace(0, 1, 16).expand(1, 3, 16, 16)  # 1/15 per pixel (half that at the replicated border)
    inside = (slice(None), slice(None), slice(1, -1))
    assert not edge_map(ramp, threshold=0.07).any() and edge_map(ramp, threshold=0.066)[inside].all()
    step, _, _ = _teeth_over_gum()
    assert edge_map(step)[0].nonzero()[:, 1].unique().tolist() == [15, 16]  # the two pixels next to the step


def test_boundary_f1_on_known_images():
    image, teeth, gum = _teeth_over_gum()
    boundary = region_boundary(teeth, gum)
    assert boundary_f1(image, boundary).tolist() == [1.0]  # a perfect output: its only edges are the boundary
    shifted = torch.roll(image, 2, dims=3)  # 2 px off: within the tolerance
    assert boundary_f1(shifted, boundary).tolist() == [1.0]
    assert boundary_f1(shifted, boundary, tolerance=1).tolist() == [0.5]  # one of the two edge columns is close
    assert boundary_f1(torch.roll(image, 3, dims=3), boundary, tolerance=1).tolist() == [0.0]
    assert boundary_f1(torch.roll(image, 4, dims=3), boundary).tolist() == [0.0]  # misplaced
    assert boundary_f1(torch.full_like(image, 0.5), boundary).tolist() == [0.0]  # no edge at all
    assert boundary_f1(_box_blur(image, 9), boundary).tolist() == [0.0]  # blurred below the edge threshold
    # a second, ghost boundary 4 px away halves the precision: P = 1/2, R = 1, F1 = 2/3
    ghost = image.clone()
    ghost[..., 20:] = 0.2
    assert boundary_f1(ghost, boundary).tolist() == [pytest.approx(2 / 3)]
    # edges far from the boundary (a tooth against the background) are not judged
    far = image.clone()
    far[..., :4] = 0.0
    assert boundary_f1(far, boundary).tolist() == [1.0]
    assert math.isnan(float(boundary_f1(image, torch.zeros_like(boundary))))


def test_masked_psnr_counts_only_the_mask():
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, :4] = True
    b[:, :, :4] = 0.1  # 20 dB inside the mask
    b[:, :, 4:] = 0.9  # ignored
    torch.testing.assert_close(masked_psnr(a, b, mask), torch.tensor([20.0, 20.0]))
    assert masked_psnr(a, a, mask).tolist() == [100.0, 100.0]
    assert math.isnan(float(masked_psnr(a, b, torch.zeros_like(mask))[0]))


def test_hf_energy_ratio_on_known_images():
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert hf_energy_ratio(image, image).tolist() == [1.0]
    assert float(hf_energy_ratio(_box_blur(image, 5), image)) < 0.1  # over-smoothed
    noise = 0.2 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    smooth = _box_blur(image, 5)
    assert float(hf_energy_ratio(smooth + noise, smooth)) > 10.0  # noisy
    # a pure low frequency has no energy above the cutoff; a flat target has none at all: NaN
    x = torch.arange(32.0)
    slow = (0.5 + 0.4 * torch.cos(2 * math.pi * x / 16)).expand(1, 3, 32, 32)  # 1/16 cycles per pixel
    fast = (0.5 + 0.4 * torch.cos(2 * math.pi * x * 3 / 8)).expand(1, 3, 32, 32)  # 3/8 cycles per pixel
    assert float(hf_energy_ratio(slow, fast)) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(float(hf_energy_ratio(fast, torch.full_like(fast, 0.5))))


def test_dental_metrics_of_a_perfect_output():
    image, teeth, gum = _teeth_over_gum()
    metrics = dental_metrics(image, image, teeth, gum)
    assert sorted(metrics) == ["boundary_f1", "hf_energy_ratio", "psnr", "ssim", "teeth_psnr"]
    assert {k: round(float(v), 4) for k, v in metrics.items()} == {
        "boundary_f1": 1.0, "hf_energy_ratio": 1.0, "psnr": 100.0, "ssim": 1.0, "teeth_psnr": 100.0}
    assert sorted(dental_metrics(image, image)) == ["hf_energy_ratio", "psnr", "ssim"]


def test_grid_layout(tmp_path):
    cond, sample, target = (torch.full((2, 3, 8, 8), v) for v in (0.0, 0.5, 1.0))
    save_grid(tmp_path / "g.png", cond, sample, target)
    pixels = np.asarray(Image.open(tmp_path / "g.png"))
    assert pixels.shape == (16, 24, 3)
    assert (pixels[:, :8] == 0).all() and (pixels[:, 8:16] == 128).all() and (pixels[:, 16:] == 255).all()
    save_grid(tmp_path / "five.png", cond, sample, sample, sample, target)
    assert np.asarray(Image.open(tmp_path / "five.png")).shape == (16, 40, 3)


def test_evaluate_writes_metrics_consistent_with_its_grids(tmp_path):
    data = write_dental(tmp_path / "heldout", count=3)
    weights = tmp_path / "w"
    backbone = TinyBackbone.random(0)
    backbone.save(weights)
    save_adapter(random_adapter(backbone.controlnet, 4, seed=1), tmp_path / "lora.safetensors")
    metrics = evaluate.main(["--data", str(data), "--lora", str(tmp_path / "lora.safetensors"), "--model", str(weights),
                             "--steps", "2", "--batch-size", "2", "--save-samples", "--out", str(tmp_path / "eval")])
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert list(saved["per_pair"]) == ["trained", "untrained", "no_control"]
    names = [r["name"] for r in saved["per_pair"]["trained"]]
    assert names == ["lower_left_0001.png", "upper_front_0000.png", "upper_top_0002.png"]
    assert "boundary_f1" not in saved["mean"]["trained"]  # no segmentation map in the dental layout
    # recompute PSNR of the first pair from the grid PNG (8-bit rounded): condition | trained | untrained |
    # no control | target
    grid = torch.from_numpy(np.asarray(Image.open(tmp_path / "eval" / "grid_000.png"), dtype=np.float32) / 255.0)
    assert grid.shape == (2 * 64, 5 * 64, 3)
    column = [grid[:64, 64 * i:64 * (i + 1)].permute(2, 0, 1)[None] for i in range(5)]
    for i, variant in enumerate(("trained", "untrained", "no_control"), start=1):
        assert float(psnr(column[i], column[4])) == pytest.approx(saved["per_pair"][variant][0]["psnr"], abs=0.1)
    # --save-samples: each grid tile also as its own file, named like the pair's target
    for i, folder in enumerate(("condition", "trained", "untrained", "no_control")):
        tile = np.asarray(Image.open(tmp_path / "eval" / "samples" / folder / "lower_left_0001.png"), np.float32)
        np.testing.assert_array_equal(tile / 255.0, column[i][0].permute(1, 2, 0).numpy())
    means = saved["mean"]
    assert len({means[v]["psnr"] for v in means}) == 3  # three different models
    assert "| trained LoRA |" in (tmp_path / "eval" / "metrics.md").read_text()
    baseline = evaluate.main(["--data", str(data), "--model", str(weights), "--steps", "2", "--batch-size", "2",
                              "--out", str(tmp_path / "base_eval")])
    assert baseline["lora"] is None and list(baseline["mean"]) == ["untrained", "no_control"]
    assert baseline["mean"]["untrained"]["psnr"] == pytest.approx(means["untrained"]["psnr"])


def test_evaluate_maps_layout_reports_dental_metrics_with_the_loras_blend(tmp_path):
    data = write_maps(tmp_path / "heldout", count=3, flat=True)
    weights = tmp_path / "w"
    backbone = TinyBackbone.random(0)
    backbone.save(weights)
    save_adapter(random_adapter(backbone.controlnet, 4, seed=1), tmp_path / "lora.safetensors",
                 {"maps": "lighting,segmentation", "blend_alpha": "0.45", "blend_mode": "overlay",
                  "seg_palette": "teeth=#C4C474,gum=#CC442C,background=#383838", "seg_tolerance": "40"})
    result = evaluate.main(["--data", str(data), "--lora", str(tmp_path / "lora.safetensors"), "--model",
                            str(weights), "--steps", "2", "--batch-size", "3", "--out", str(tmp_path / "eval")])
    assert result["settings"]["maps"] == "lighting,segmentation"
    assert (result["settings"]["blend_alpha"], result["settings"]["blend_mode"]) == (0.45, "overlay")
    for variant in ("trained", "untrained", "no_control"):
        means = result["mean"][variant]
        assert set(means) == {"ssim", "psnr", "boundary_f1", "teeth_psnr", "hf_energy_ratio", "condition_fidelity"}
        assert 0.0 <= means["boundary_f1"] <= 1.0 and means["teeth_psnr"] > 0
    # the drawn targets have sharp teeth/gum edges: a high reference F1
    assert result["target_boundary_f1"] > 0.5
    table = (tmp_path / "eval" / "metrics.md").read_text()
    for label in ("boundary F1", "teeth PSNR (dB)", "HF energy ratio", "trained LoRA", "untrained (base alone)",
                  "no control (UNet alone)", "target (reference)"):
        assert label in table
    # the grid's condition column is the LoRA's blend (alpha 0.45, overlay) of the maps
    from train.dataset import MapBlend, check_dataset, load_condition

    pairs, _ = check_dataset(data, blend=MapBlend.parse("lighting,segmentation", 0.45, "overlay"))
    grid = np.asarray(Image.open(tmp_path / "eval" / "grid_000.png"), dtype=np.float32) / 255.0
    assert np.abs(grid[:64, :64] - load_condition(pairs[0])).max() <= 0.5 / 255 + 1e-6
