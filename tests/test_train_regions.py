"""The tooth-weighted loss: options, masks on the latent grid, the loss and its gradient, the cache,
the warning for maps without teeth, and the trainer end to end (metadata round trip)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ComfyUI_CtrLoRA.nodes.handles import LoRAHandle
from ctrlora_core.errors import CtrLoRAError
from ctrlora_core.formats import scan_file
from train_data import BACKGROUND, GUM, TEETH, one_thread, write_maps  # noqa: F401
from train import train_lora
from train.backbones.tiny import TinyBackbone
from train.dataset import MapBlend, check_dataset
from train.latent_cache import cached_latents, latents_key
from train.regions import (
    RegionWeights,
    format_palette,
    latent_masks,
    missing_region_warnings,
    parse_palette,
    weight_map,
    weighted_mse,
)

pytestmark = pytest.mark.usefixtures("one_thread")
BLEND = MapBlend.parse("lighting,segmentation")
TEETH_5 = RegionWeights.parse("teeth=5,gum=1")


def test_options_parse_and_round_trip():
    assert TEETH_5.weights == (("teeth", 5.0), ("gum", 1.0)) and TEETH_5.names == ("teeth", "gum")
    assert TEETH_5.metadata() == {"region_weights": "teeth=5,gum=1",
                                  "seg_palette": "teeth=#C4C474,gum=#CC442C,background=#383838",
                                  "seg_tolerance": "40"}
    palette = parse_palette("Teeth=#c8c878, enamel=FF0000")
    assert palette == {"teeth": (200, 200, 120), "gum": (204, 68, 44), "background": (56, 56, 56),
                       "enamel": (255, 0, 0)}
    assert parse_palette(format_palette(palette)) == palette
    assert RegionWeights.parse("enamel=2", "enamel=#FF0000", 10).cache_key() == {
        "regions": ["enamel"], "palette": "teeth=#C4C474,gum=#CC442C,background=#383838,enamel=#FF0000",
        "tolerance": 10.0}


@pytest.mark.parametrize(("weights", "palette", "problem"), [
    ("teeth", "", "--region-weights 'teeth': expected name=value pairs"),
    ("teeth=5,,gum=1", "", "expected name=value pairs separated by commas, got ''"),
    ("teeth=five", "", "weight of 'teeth' must be a number, got 'five'"),
    ("teeth=-1", "", "weight of 'teeth' must be finite and >= 0"),
    ("teeth=nan", "", "weight of 'teeth' must be finite and >= 0"),
    ("teeth=5,teeth=2", "", "a region is named twice"),
    ("enamel=5", "", "region 'enamel' has no colour; the palette has teeth, gum, background"),
    ("teeth=5", "teeth=#C4C47", "colour of 'teeth' must be #RRGGBB (hex), got '#C4C47'"),
    ("teeth=5", "teeth", "--seg-palette 'teeth': expected name=value pairs"),
])
def test_bad_options_are_refused_by_name(weights, palette, problem):
    with pytest.raises(CtrLoRAError, match=problem.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        RegionWeights.parse(weights, palette)


def _seg_image(size=32, teeth_block=(8, 24, 8, 16), gum_block=(16, 24, 8, 24)):
    """A segmentation map: background, a block of teeth and a block of gum (rows, cols in pixels)."""
    seg = np.empty((size, size, 3), np.float32)
    seg[:] = np.array(BACKGROUND) / 255
    r0, r1, c0, c1 = teeth_block
    seg[r0:r1, c0:c1] = np.array(TEETH) / 255
    r0, r1, c0, c1 = gum_block
    seg[r0:r1, c0:c1][~(seg[r0:r1, c0:c1] == np.array(TEETH, np.float32) / 255).all(-1)] = np.array(GUM) / 255
    return seg


def test_latent_masks_are_the_region_fractions_on_the_latent_grid():
    seg = _seg_image()
    masks, pixels = latent_masks(seg, TEETH_5, (4, 4))  # 8x8 pixels per latent position
    teeth, gum = masks
    assert pixels.tolist() == [16 * 8, 8 * 8]  # teeth rows 8-23 x cols 8-15; gum rows 16-23 x cols 16-23
    # the blocks cover whole 8x8 cells: inside a region the mask is 1, outside 0
    assert teeth.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert gum.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    # bilinear at 1/8: a latent position is the mean of the 2x2 pixels at its cell's centre (rows/cols 3-4 + 8k)
    line = _seg_image(teeth_block=(12, 13, 0, 32), gum_block=(0, 0, 0, 0))  # one row of the two centre rows
    line_teeth = latent_masks(line, TEETH_5, (4, 4))[0][0]
    assert line_teeth.tolist() == [[0] * 4, [0.5] * 4, [0] * 4, [0] * 4]


def test_weight_map_is_one_plus_the_weighted_masks():
    masks = torch.tensor([[[[1.0, 0.0, 0.5, 0.0]], [[0.0, 1.0, 0.5, 0.0]]]])  # [B=1, R=2, 1, 4]
    weights = torch.tensor([5.0, 2.0])
    assert weight_map(masks, weights).tolist() == [[[[5.0, 2.0, 1 + 0.5 * 4 + 0.5 * 1, 1.0]]]]


def test_all_weights_one_is_exactly_the_plain_mse():
    g = torch.Generator().manual_seed(0)
    eps, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    masks = torch.rand(3, 2, 8, 8, generator=g)
    weight = weight_map(masks, torch.tensor([1.0, 1.0]))
    assert torch.equal(weight, torch.ones(3, 1, 8, 8))
    assert torch.equal(weighted_mse(eps, noise, weight), F.mse_loss(eps, noise))


def test_a_regions_gradient_scales_by_its_weight():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    start = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    masks, _ = latent_masks(_seg_image(), TEETH_5, (4, 4))
    masks = masks.double()[None].expand(2, -1, -1, -1)
    teeth = masks[:, :1] > 0.5

    def grad(weights):
        eps = start.clone().requires_grad_(True)
        if weights is None:
            F.mse_loss(eps, noise).backward()
        else:
            weighted_mse(eps, noise, weight_map(masks, torch.tensor(weights, dtype=torch.float64))).backward()
        return eps.grad

    plain, weighted = grad(None), grad([5.0, 1.0])
    expanded = teeth.expand_as(plain)
    torch.testing.assert_close(weighted[expanded], 5.0 * plain[expanded], rtol=1e-12, atol=0)
    torch.testing.assert_close(weighted[~expanded], plain[~expanded], rtol=1e-12, atol=0)
    gum_heavy = grad([1.0, 3.0])
    gum = (masks[:, 1:] > 0.5).expand_as(plain)
    torch.testing.assert_close(gum_heavy[gum], 3.0 * plain[gum], rtol=1e-12, atol=0)


def test_warning_lines_name_each_map_without_teeth_once():
    pixels = torch.tensor([[10, 0], [0, 5], [0, 0]])
    lines = missing_region_warnings(["a.png", "b.png", "c.png"], pixels, TEETH_5)
    assert [line.split(":")[0] for line in lines] == ["b.png", "c.png"]  # gum has weight 1: no warning
    assert "no pixel within 40 of the colour of teeth #C4C474" in lines[0]
    both = missing_region_warnings(["c.png"], pixels[2:], RegionWeights.parse("teeth=5,gum=2"))
    assert len(both) == 1 and "teeth #C4C474, gum #CC442C" in both[0]


def test_masks_are_cached_with_the_latents_and_the_key_follows_what_changes_them(tmp_path):
    root = write_maps(tmp_path / "m", count=3)
    pairs, _ = check_dataset(root, blend=BLEND)
    backbone = TinyBackbone.random(0)
    built, was_built = cached_latents(backbone, pairs, (64, 64), tmp_path / "c", "id", show_progress=False,
                                      regions=TEETH_5)
    again, was_built_again = cached_latents(backbone, pairs, (64, 64), tmp_path / "c", "id", show_progress=False,
                                            regions=TEETH_5)
    assert was_built and not was_built_again
    assert built.region_masks.shape == (3, 2, 8, 8) and torch.equal(built.region_masks, again.region_masks)
    assert torch.equal(built.region_pixels, again.region_pixels) and bool((built.region_pixels > 0).all())
    key = latents_key(pairs, "id", (64, 64), TEETH_5)
    assert key == latents_key(pairs, "id", (64, 64), RegionWeights.parse("teeth=8,gum=1"))  # weights: not cached
    assert len({key, latents_key(pairs, "id", (64, 64)),
                latents_key(pairs, "id", (64, 64), RegionWeights.parse("teeth=5,gum=1", "teeth=#C8C878")),
                latents_key(pairs, "id", (64, 64), RegionWeights.parse("teeth=5,gum=1", "", 20)),
                latents_key(pairs, "id", (64, 64), RegionWeights.parse("teeth=5")),
                latents_key(check_dataset(root, blend=MapBlend.parse("lighting,seg", 0.5))[0], "id", (64, 64),
                            TEETH_5),
                latents_key(check_dataset(root, blend=MapBlend.parse("lighting,seg", 0.3, "overlay"))[0], "id",
                            (64, 64), TEETH_5)}) == 7


# ---------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def maps_data(tmp_path_factory):
    root = write_maps(tmp_path_factory.mktemp("maps") / "teeth", count=6, flat=True)
    # one segmentation map without teeth (e.g. rendered with another palette)
    seg = root / "segmentation_lower_patient7_bottom.png"
    pixels = np.asarray(Image.open(seg)).copy()
    pixels[(pixels == TEETH).all(-1)] = (250, 250, 250)
    Image.fromarray(pixels).save(seg)
    return root


def train(data, out, *extra):
    args = ["--data", str(data), "--model", "tiny-random", "--out", str(out), "--rank", "4", "--lr", "3e-3",
            "--val-every", "0", "--log-every", "1", "--steps", "2", "--batch-size", "2", "--maps",
            "lighting,segmentation", *map(str, extra)]
    return train_lora.main(args)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_trainer_records_maps_blend_and_region_weights_and_the_loader_shows_them(maps_data, tmp_path, capsys):
    summary = train(maps_data, tmp_path / "run", "--region-weights", "teeth=5,gum=1", "--blend-alpha", "0.35")
    metadata = scan_file(summary["lora"]).metadata
    assert {k: metadata[k] for k in ("maps", "blend_mode", "blend_alpha", "region_weights", "seg_palette",
                                     "seg_tolerance")} == {
        "maps": "lighting,segmentation", "blend_mode": "alpha", "blend_alpha": "0.35",
        "region_weights": "teeth=5,gum=1", "seg_palette": "teeth=#C4C474,gum=#CC442C,background=#383838",
        "seg_tolerance": "40"}
    summary_line = LoRAHandle.from_file(summary["lora"], 1.0).summary()
    assert "maps lighting+segmentation (alpha blend 0.35)" in summary_line
    assert "region weights teeth=5,gum=1" in summary_line
    # the map without teeth is named once, although it is drawn in several steps
    out = capsys.readouterr().out
    assert out.count("segmentation_lower_patient7_bottom.png: no pixel within 40 of the colour of teeth") == 1
    assert out.count("no pixel within") == 1
    # a second run reads masks and counts from the cache and warns again, once
    train(maps_data, tmp_path / "run2", "--region-weights", "teeth=5,gum=1", "--blend-alpha", "0.35",
          "--cache-dir", str(tmp_path / "run" / "cache"))
    again = capsys.readouterr().out
    assert "latent cache: reused" in again and again.count("no pixel within") == 1


def test_weights_of_one_give_the_plain_loss_and_weights_change_the_training(maps_data, tmp_path):
    plain = train(maps_data, tmp_path / "plain")
    ones = train(maps_data, tmp_path / "ones", "--region-weights", "teeth=1,gum=1")
    teeth = train(maps_data, tmp_path / "teeth", "--region-weights", "teeth=5,gum=1")
    first = [_log(tmp_path / name)[0] for name in ("plain", "ones", "teeth")]
    assert first[0]["loss"] == first[1]["loss"]  # the same batch, the same parameters: the same loss bits
    assert first[2]["loss"] > first[0]["loss"]  # W >= 1 everywhere and > 1 on the teeth
    assert "region_weights" not in scan_file(plain["lora"]).metadata
    assert plain["loss"] != teeth["loss"]


def test_region_weights_need_the_maps_layout_with_a_segmentation_map(maps_data, tmp_path, capsys):
    for extra in (["--maps", ""], ["--maps", "lighting"]):
        with pytest.raises(SystemExit):
            train(maps_data, tmp_path / "x", "--region-weights", "teeth=5", *extra)
        assert "--region-weights needs the maps layout with a segmentation map" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train(maps_data, tmp_path / "x", "--blend-mode", "lighten")
    assert "--blend-mode must be one of" in capsys.readouterr().err
