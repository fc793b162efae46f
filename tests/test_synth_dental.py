"""The procedural dental dataset of the demo: names, sizes, determinism, per-tooth segmentation."""
import os

import numpy as np
import pytest

from ctrlora_core.conditions import blend_lighting_seg, load_image
from ctrlora_core.prompts import PromptTemplate, parse_dental_name
from demo import synth_dental as sd
from train.dataset import find_pairs


def test_dataset_files_names_and_prompts(tmp_path):
    names = sd.write_dataset(tmp_path, count=12, seed=3, size=32, start=5, extra_maps=("depth", "edges"))
    assert names == [sd.sample_name(*sd.jaw_view_for_index(i), i) for i in range(5, 17)]
    assert len({tuple(parse_dental_name(n)) for n in names}) == 10  # all jaw/view pairs appear
    for folder in ("source", "target", "source_lighting", "source_seg", "depth", "edges"):
        assert sorted(os.listdir(tmp_path / folder)) == sorted(names)
    assert not (tmp_path / "normal").exists()
    for name in names[:3]:
        for folder in ("source", "target", "source_lighting"):
            assert load_image(tmp_path / folder / name).shape == (32, 32, 3)
    pairs, issues = find_pairs(tmp_path)  # the trainer's dental layout: prompts from the names
    assert issues == [] and sorted(p.target.name for p in pairs) == sorted(names)
    assert all(p.prompt == PromptTemplate().for_file(p.target.name) for p in pairs)


def test_source_is_the_blend_of_the_saved_lighting_and_seg(tmp_path):
    (name,) = sd.write_dataset(tmp_path, count=1, seed=0, size=32, alpha=0.5, mode="overlay")
    lighting = load_image(tmp_path / "source_lighting" / name)
    seg = load_image(tmp_path / "source_seg" / name)
    source = load_image(tmp_path / "source" / name)
    # both inputs were rounded to 8 bits before saving, the blend was not
    assert np.abs(blend_lighting_seg(lighting, seg, 0.5, "overlay") - source).max() <= 2.5 / 255


def test_rendering_is_deterministic_per_seed_and_index():
    a = sd.render(sd.make_scene(seed=1, index=4), size=32)
    b = sd.render(sd.make_scene(seed=1, index=4), size=32)
    c = sd.render(sd.make_scene(seed=2, index=4), size=32)
    for key in ("lighting", "seg", "target", "depth", "normal", "edges", "labels"):
        np.testing.assert_array_equal(a[key], b[key])
    assert np.abs(a["target"] - c["target"]).mean() > 0.01


@pytest.mark.parametrize("index", [0, 5])  # lower_top, upper_top
def test_segmentation_has_one_distinct_colour_per_tooth(index):
    maps = sd.render(sd.make_scene(seed=0, index=index), size=64)
    labels, seg = maps["labels"], maps["seg"]
    teeth = sorted(set(np.unique(labels)) - {sd.BACKGROUND_LABEL, sd.GUM_LABEL})
    assert len(teeth) >= 8  # most of the 14 teeth are visible
    colours = set()
    for tooth in teeth:
        pixels = seg[labels == tooth]
        np.testing.assert_array_equal(pixels, np.broadcast_to(sd.TOOTH_COLOURS[tooth], pixels.shape))
        colours.add(tuple(pixels[0]))
    assert len(colours) == len(teeth)
    np.testing.assert_array_equal(seg[labels == sd.BACKGROUND_LABEL], 0.0)
    np.testing.assert_array_equal(seg[labels == sd.GUM_LABEL], np.broadcast_to(sd.GUM_COLOUR, seg[labels == sd.GUM_LABEL].shape))


@pytest.mark.parametrize("jaw, sign", [("lower", 1), ("upper", -1)])
def test_crowns_point_away_from_the_gums_in_the_front_view(jaw, sign):
    maps = sd.render(sd.make_scene(seed=0, index=0, jaw=jaw, view="front"), size=64)
    rows = np.arange(64)[:, None].repeat(64, axis=1)  # image row, 0 = top
    labels = maps["labels"]
    tooth_row = rows[(labels >= 0) & (labels != sd.GUM_LABEL)].mean()
    gum_row = rows[labels == sd.GUM_LABEL].mean()
    assert sign * (gum_row - tooth_row) > 3  # lower crowns above the gums, upper below


def test_target_shading_follows_the_lighting_map():
    maps = sd.render(sd.make_scene(seed=0, index=7), size=64)
    teeth = (maps["labels"] >= 0) & (maps["labels"] != sd.GUM_LABEL)
    brightness = maps["target"].mean(axis=2)[teeth]
    assert np.corrcoef(maps["lighting"][..., 0][teeth], brightness)[0, 1] > 0.6
    assert maps["target"][maps["labels"] == sd.BACKGROUND_LABEL].std() > 0  # studio gradient, not flat


def test_unknown_extra_map_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="extra_maps"):
        sd.write_dataset(tmp_path, count=1, extra_maps=("albedo",))
