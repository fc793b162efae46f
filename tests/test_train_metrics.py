"""Validation metrics, the grid PNG, and train/evaluate.py."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ctrlora_core.formats import save_adapter
from ctrlora_core.random_weights import random_adapter
from train_data import one_thread, write_dental  # noqa: F401
from train import evaluate
from train.backbones.tiny import TinyBackbone
from train.metrics import edge_correlation, psnr, ssim
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


def test_grid_layout(tmp_path):
    cond, sample, target = (torch.full((2, 3, 8, 8), v) for v in (0.0, 0.5, 1.0))
    save_grid(tmp_path / "g.png", cond, sample, target)
    pixels = np.asarray(Image.open(tmp_path / "g.png"))
    assert pixels.shape == (16, 24, 3)
    assert (pixels[:, :8] == 0).all() and (pixels[:, 8:16] == 128).all() and (pixels[:, 16:] == 255).all()


def test_evaluate_writes_metrics_consistent_with_its_grids(tmp_path):
    data = write_dental(tmp_path / "heldout", count=3)
    weights = tmp_path / "w"
    backbone = TinyBackbone.random(0)
    backbone.save(weights)
    save_adapter(random_adapter(backbone.controlnet, 4, seed=1), tmp_path / "lora.safetensors")
    metrics = evaluate.main(["--data", str(data), "--lora", str(tmp_path / "lora.safetensors"), "--model", str(weights),
                             "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "eval")])
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    names = [r["name"] for r in saved["per_pair"]]
    assert names == ["lower_left_0001.png", "upper_front_0000.png", "upper_top_0002.png"]
    # recompute PSNR of the first pair from the grid PNG (sample and target columns, 8-bit rounded)
    grid = torch.from_numpy(np.asarray(Image.open(tmp_path / "eval" / "grid_000.png"), dtype=np.float32) / 255.0)
    sample, target = grid[:64, 64:128].permute(2, 0, 1)[None], grid[:64, 128:].permute(2, 0, 1)[None]
    assert float(psnr(sample, target)) == pytest.approx(saved["per_pair"][0]["psnr"], abs=0.1)
    baseline = evaluate.main(["--data", str(data), "--model", str(weights), "--steps", "2", "--out",
                              str(tmp_path / "base_eval")])
    assert baseline["lora"] is None and baseline["mean"]["psnr"] != metrics["mean"]["psnr"]
