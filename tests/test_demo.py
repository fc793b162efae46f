"""The bundled demo, run end to end at a tiny setting: files, and report numbers computed from real samples."""
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from ctrlora_core.formats import load_adapter
from float_reference import EPS32
from demo import run_demo as demo
from train.backbones.tiny import TinyBackbone


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    report = demo.main(["--out", str(out), "--train-count", "8", "--heldout-count", "3", "--steps", "2",
                        "--batch-size", "2", "--rank", "4", "--sample-steps", "2", "--preview-rows", "2"])
    return out, report


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0


def test_demo_writes_a_lora_that_fits_the_demo_base(demo_run):
    out, _ = demo_run
    base = TinyBackbone.load(demo.DEFAULT_WEIGHTS).controlnet
    lora = load_adapter(out / "lora.safetensors", base)  # raises unless every key and shape fits
    assert lora.rank == 4
    assert lora.metadata["training_steps"] == "2"
    assert lora.metadata["condition"] == "dental_lighting_seg"


def test_report_numbers_are_the_errors_of_the_saved_samples(demo_run):
    out, report = demo_run
    assert json.loads((out / "report.json").read_text()) == report
    names = report["per_image"]["names"]
    assert len(names) == 3
    # The PNG holds the sample rounded to 8 bits: each value moves by at most q (half a step, plus a
    # few float32 steps from the report's arithmetic on sample and target), so by Cauchy-Schwarz
    # (mean |s - t| <= sqrt(mse)) the MSE moves by at most 2 q sqrt(mse) + q^2; the report's float32
    # mean of n values adds at most log2(n) float32 steps of it (pairwise summation).
    q = 0.5 / 255 + 4 * EPS32
    for which in ("trained", "untrained"):
        for name, mse in zip(names, report["per_image"][which]["mse"]):
            sample = _pixels(out / "samples" / which / name)
            target = _pixels(out / "data" / "heldout" / "target" / name)
            summing = math.log2(sample.size) * EPS32 * mse
            assert abs(((sample - target) ** 2).mean() - mse) <= 2 * q * math.sqrt(mse) + q * q + summing
        for metric in ("mse", "psnr", "ssim"):
            assert math.isfinite(report["mean"][which][metric])
    # two steps at a high learning rate already move the LoRA away from the base
    trained = [_pixels(out / "samples" / "trained" / n) for n in names]
    untrained = [_pixels(out / "samples" / "untrained" / n) for n in names]
    assert max(np.abs(a - b).max() for a, b in zip(trained, untrained)) > 0
    assert "| trained LoRA |" in (out / "report.md").read_text()


def test_preview_has_four_labelled_columns(demo_run):
    out, _ = demo_run
    width, height = Image.open(out / "preview.png").size
    assert width == 4 * 64 * 3
    assert height > 2 * 64 * 3  # two rows under a header


def test_damaged_weights_are_reported_by_name(tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(demo.DEFAULT_WEIGHTS, weights)
    with open(weights / "unet.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    with pytest.raises(SystemExit, match="unet.safetensors does not match its sha256"):
        demo.check_weights(weights)
