"""The procedural dental dataset of the demo: the maps layout, the user's names and palette, determinism,
per-tooth segmentation (the pretraining's condition)."""
import os
import re

import numpy as np
import pytest

from ctrlora_core.conditions import DENTAL_PALETTE, load_image
from ctrlora_core.prompts import parse_dental_name
from demo import synth_dental as sd

# The shapes of the user's file names (issue 10), without the map-kind prefix.
KEY_SHAPE = re.compile(r"^(?P<jaw>upper|lower)_(?P<id>[0-9A-F]{8}|patient\d+|[a-z]+)_"
                       r"(?P<view>top|front|bottom|left|right)(?P<detail>(_slightly)?(_(top|bottom|left|right|up|down))*)"
                       r"(?P<tail>_\d+|_weight_5)?\.png$")


def test_maps_dataset_layout(tmp_path):
    keys = sd.write_maps_dataset(tmp_path, count=12, seed=3, size=32, start=5)
    assert keys == [sd.sample_key(3, i) for i in range(5, 17)]
    names = sorted(k.name for k in keys)
    assert len(set(names)) == 12
    assert sorted(os.listdir(tmp_path)) == ["lighting", "segmentation", "target"]
    for folder in sd.MAP_FOLDERS:
        assert sorted(os.listdir(tmp_path / folder)) == names
    for index, key in zip(range(5, 17), keys):
        lighting = load_image(tmp_path / "lighting" / key.name)
        assert lighting.shape == (32, 32, 3)
        np.testing.assert_array_equal(lighting[..., 0], lighting[..., 1])  # grey
        np.testing.assert_array_equal(lighting[..., 0], lighting[..., 2])
        maps = sd.render(sd.make_scene(3, index, view_detail=key.view_detail), 32)
        np.testing.assert_array_equal(load_image(tmp_path / "target" / key.name),
                                      np.round(maps["target"] * 255) / 255)  # the render, as 8 bits
        np.testing.assert_array_equal(load_image(tmp_path / "segmentation" / key.name),
                                      sd.segmentation_map(maps["labels"]))


def test_segmentation_is_flat_palette_colours_and_nearest_colour_finds_teeth_and_gums():
    palette = np.array([sd.SEG_PALETTE[k] for k in ("teeth", "gum", "background")], np.float32)
    assert sd.SEG_PALETTE == {"teeth": (196, 196, 116), "gum": (204, 68, 44), "background": (56, 56, 56)}
    assert {k: tuple(v) for k, v in DENTAL_PALETTE.items()} == sd.SEG_PALETTE  # the trainer's palette
    for index in (0, 1, 7):
        maps = sd.render(sd.make_scene(0, index), size=64)
        labels, seg = maps["labels"], np.round(sd.segmentation_map(maps["labels"]) * 255)
        assert {tuple(c) for c in seg.reshape(-1, 3)} == {tuple(c) for c in palette}  # all three, nothing else
        distance = np.linalg.norm(seg[:, :, None, :] - palette, axis=-1)  # [H, W, 3 regions]
        nearest = np.where(distance.min(axis=-1) <= 30, distance.argmin(axis=-1), -1)
        teeth = (labels != sd.BACKGROUND_LABEL) & (labels != sd.GUM_LABEL)
        np.testing.assert_array_equal(nearest == 0, teeth)
        np.testing.assert_array_equal(nearest == 1, labels == sd.GUM_LABEL)
        np.testing.assert_array_equal(nearest == 2, labels == sd.BACKGROUND_LABEL)


def test_keys_have_the_shapes_of_the_users_file_names():
    keys = [sd.sample_key(0, i) for i in range(90)]
    assert len({k.name for k in keys}) == len(keys)
    shapes = [KEY_SHAPE.match(k.name) for k in keys]
    assert all(shapes), [k.name for k, m in zip(keys, shapes) if not m]
    for key, shape in zip(keys, shapes):
        assert (shape["jaw"], shape["view"]) == (key.jaw, key.view)
        assert shape["detail"].split("_")[1:] == list(key.view_detail)
    ids = [m["id"] for m in shapes]
    assert any(re.fullmatch(r"[0-9A-F]{8}", i) for i in ids) and any(i.startswith("patient") for i in ids)
    assert any(i in sd.SURNAMES for i in ids)
    details = {k.view_detail for k in keys}
    assert {("top", "left"), ("slightly", "up"), ()} <= details
    assert {m["tail"] for m in shapes} >= {None, "_1", "_weight_5"}
    assert {(k.jaw, k.view) for k in keys} == {(j, v) for j in sd.JAWS for v in sd.VIEWS}


def test_keys_parse_with_the_dental_parser():
    for key in (sd.sample_key(0, i) for i in range(40)):
        tags = parse_dental_name(key.name)
        assert (tags.jaw, tags.view) == (key.jaw, key.view), key.name
        assert tags.view_detail == " ".join(key.view_detail), key.name
        for prefix in ("lighting_", "seg_", "segmentation_"):
            assert tuple(parse_dental_name(prefix + key.name))[:2] == (key.jaw, key.view)


def test_maps_dataset_is_deterministic(tmp_path):
    def files(root):
        return {(folder, name): (root / folder / name).read_bytes()
                for folder in sd.MAP_FOLDERS for name in sorted(os.listdir(root / folder))}

    sd.write_maps_dataset(tmp_path / "a", count=4, seed=5, size=32)
    sd.write_maps_dataset(tmp_path / "b", count=4, seed=5, size=32)
    sd.write_maps_dataset(tmp_path / "c", count=4, seed=6, size=32)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    a, c = files(tmp_path / "a"), files(tmp_path / "c")
    assert sorted(a) != sorted(c)  # other ids
    assert [v for k, v in sorted(a.items()) if k[0] == "target"] != [v for k, v in sorted(c.items()) if k[0] == "target"]


def test_view_detail_turns_the_camera_and_keeps_the_scene():
    plain = sd.make_scene(0, 1)  # upper front
    assert plain.view_detail == ()
    for words, degrees in ((("top",), 15.0), (("slightly", "up"), 7.5), (("top", "left"), None)):
        turned = sd.make_scene(0, 1, view_detail=words)
        np.testing.assert_array_equal(turned.solids.centres, plain.solids.centres)  # same arch
        np.testing.assert_array_equal(turned.tooth_tint, plain.tooth_tint)
        angle = np.degrees(np.arccos(np.clip(turned.direction @ plain.direction, -1, 1)))
        if degrees is not None:
            assert angle == pytest.approx(degrees, abs=1e-6)
        else:
            assert angle == pytest.approx(np.degrees(np.arctan(np.tan(np.radians(15)) * np.sqrt(2))), abs=1e-6)
    # the camera moves up (so looks further down) and to the image left (so looks further right)
    top_left = sd.make_scene(0, 1, view_detail=("top", "left")).direction
    assert top_left @ plain.up < 0 and top_left @ plain.right > 0
    with pytest.raises(ValueError, match="view_detail"):
        sd.make_scene(0, 1, view_detail=("sideways",))


def test_cli_writes_the_maps_layout(tmp_path):
    sd.main(["--out", str(tmp_path), "--count", "2", "--size", "32", "--start", "3", "--extra-maps", "depth"])
    assert sorted(os.listdir(tmp_path)) == ["depth", "lighting", "segmentation", "target"]
    assert sorted(os.listdir(tmp_path / "target")) == sorted(sd.sample_key(0, i).name for i in (3, 4))


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
        sd.write_maps_dataset(tmp_path, count=1, extra_maps=("albedo",))
