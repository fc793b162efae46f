"""The bundled demo, run end to end at a tiny setting: the maps-layout recipe, the evaluator's dental
metrics in the report, and the preview built from the evaluator's samples."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from ctrlora_core.formats import load_adapter
from demo import run_demo as demo
from train.backbones.tiny import TinyBackbone

DENTAL_METRICS = {"ssim", "psnr", "boundary_f1", "teeth_psnr", "hf_energy_ratio"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    report = demo.main(["--out", str(out), "--train-count", "4", "--heldout-count", "2", "--steps", "2",
                        "--batch-size", "2", "--rank", "4", "--sample-steps", "2", "--preview-rows", "2"])
    return out, report


def test_demo_trains_the_dental_recipe_on_the_maps_layout(demo_run):
    out, _ = demo_run
    assert sorted(p.name for p in (out / "data" / "train").iterdir()) == ["lighting", "segmentation", "target"]
    base = TinyBackbone.load(demo.DEFAULT_WEIGHTS).controlnet
    lora = load_adapter(out / "lora.safetensors", base)  # raises unless every key and shape fits
    assert lora.rank == 4
    meta = lora.metadata
    assert (meta["training_steps"], meta["condition"]) == ("2", "dental_lighting_seg")
    assert (meta["maps"], float(meta["blend_alpha"]), meta["region_weights"]) == (
        "lighting,segmentation", 0.3, "teeth=5,gum=1")


def test_report_holds_the_evaluators_dental_metrics_for_three_variants(demo_run):
    out, report = demo_run
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    evaluation = report["evaluation"]
    assert evaluation == json.loads((out / "eval" / "metrics.json").read_text())
    assert evaluation["pairs"] == 2
    for variant in ("trained", "untrained", "no_control"):
        assert DENTAL_METRICS <= set(evaluation["mean"][variant])
    means = evaluation["mean"]
    for key, gain in report["gains_over_untrained"].items():
        assert gain == means["trained"][key] - means["untrained"][key]
    pairs = evaluation["per_pair"]
    assert report["pairs_with_better_teeth_psnr"] == sum(
        t["teeth_psnr"] > u["teeth_psnr"] for t, u in zip(pairs["trained"], pairs["untrained"]))
    text = (out / "report.md").read_text()
    for label in ("trained LoRA", "untrained (base alone)", "no control (UNet alone)", "teeth PSNR (dB)",
                  "boundary F1", "HF energy ratio"):
        assert label in text


def test_preview_columns_are_condition_untrained_trained_target(demo_run):
    out, report = demo_run
    preview = np.asarray(Image.open(out / "preview.png").convert("RGB"))
    zoom, size, header = 3, 64, 14
    assert preview.shape == (header + 2 * size * zoom, 4 * size * zoom, 3)
    samples = out / "eval" / "samples"
    shown = demo.synth_dental.sample_key(0, 4).name  # the first row: the first held-out index (= train count)
    assert shown in [r["name"] for r in report["evaluation"]["per_pair"]["trained"]]
    for column, path in enumerate((samples / "condition" / shown, samples / "untrained" / shown,
                                   samples / "trained" / shown, out / "data" / "heldout" / "target" / shown)):
        tile = preview[header:header + size * zoom:zoom, column * size * zoom:(column + 1) * size * zoom:zoom]
        np.testing.assert_array_equal(tile, np.asarray(Image.open(path).convert("RGB")), err_msg=str(path))


def test_the_pretraining_seed_is_refused_for_the_data(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "out"), "--data-seed", str(demo.PRETRAIN_SEED)])
    assert not (tmp_path / "out").exists()


def test_damaged_weights_are_reported_by_name(tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(demo.DEFAULT_WEIGHTS, weights)
    with open(weights / "unet.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    with pytest.raises(SystemExit, match="unet.safetensors does not match its sha256"):
        demo.check_weights(weights)
