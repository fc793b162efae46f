"""Dataset layouts, prompts from file names, and validation: every bad case is reported by file name."""
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from ComfyUI_CtrLoRA.nodes.dental import CtrLoRABlendLightingSeg
from ctrlora_core.conditions import ConditionError, blend_lighting_seg
from ctrlora_core.errors import CtrLoRAError
from ctrlora_core.prompts import PromptTemplate
from train_data import MAP_KEYS, write_dental, write_maps, write_official
from train.dataset import (
    DatasetError,
    MapBlend,
    check_dataset,
    check_images,
    find_pairs,
    load_condition,
    load_pair,
)

BLEND = MapBlend.parse("lighting,segmentation")


def _issues_for(root, **kwargs):
    with pytest.raises(DatasetError) as err:
        check_dataset(root, **kwargs)
    return err.value.issues, str(err.value)


def test_dental_layout_prompts_from_file_names(tmp_path):
    root = write_dental(tmp_path / "d", count=3)
    pairs, issues = find_pairs(root)
    assert issues == []
    names = [p.name for p in pairs]
    assert names == ["lower_left_0001.png", "upper_front_0000.png", "upper_top_0002.png"]
    by_name = {p.name: p.prompt for p in pairs}
    assert by_name["upper_front_0000.png"] == PromptTemplate().render("upper", "front")
    assert by_name["lower_left_0001.png"] == PromptTemplate().render("lower", "left")


def test_custom_template_and_sidecar_prompt(tmp_path):
    root = write_dental(tmp_path / "d", count=2)
    (root / "target" / "lower_left_0001.txt").write_text("  my own words \n")
    pairs, _ = find_pairs(root, PromptTemplate("{jaw} jaw from the {view}"))
    by_name = {p.name: p.prompt for p in pairs}
    assert by_name["upper_front_0000.png"] == "upper jaw from the front"
    assert by_name["lower_left_0001.png"] == "my own words"


def test_source_and_target_may_differ_in_extension(tmp_path):
    root = write_dental(tmp_path / "d", count=1)
    src = root / "source" / "upper_front_0000.png"
    Image.open(src).convert("RGB").save(src.with_suffix(".jpg"), quality=95)
    src.unlink()
    pairs, issues = check_dataset(root)
    assert issues == [] and pairs[0].source.suffix == ".jpg"


def test_official_layout_json_lines_and_array(tmp_path):
    for as_array in (False, True):
        root = write_official(tmp_path / f"o{as_array}", count=3, as_array=as_array)
        pairs, issues = check_dataset(root)
        assert issues == []
        assert [p.prompt for p in pairs] == ["a disc number 0", "a disc number 1", "a disc number 2"]
        assert pairs[1].source == root / "source" / "1.png"


def test_missing_pairs_are_named(tmp_path):
    root = write_dental(tmp_path / "d", count=4)
    (root / "target" / "upper_front_0000.png").unlink()
    (root / "source" / "lower_left_0001.png").unlink()
    issues, message = _issues_for(root)
    paths = {i.path.split("/")[-2] + "/" + i.path.split("/")[-1]: i.problem for i in issues}
    assert "missing pair" in paths["source/upper_front_0000.png"]
    assert "missing pair" in paths["target/lower_left_0001.png"]
    assert "upper_front_0000.png" in message and "lower_left_0001.png" in message


def test_official_layout_bad_entries_are_named(tmp_path):
    root = write_official(tmp_path / "o", count=2)
    lines = (root / "prompt.json").read_text().splitlines()
    lines.append("{not json")
    lines.append(json.dumps({"source": "source/0.png", "prompt": "no target"}))
    lines.append(json.dumps({"source": "source/9.png", "target": "target/9.png", "prompt": "gone"}))
    (root / "prompt.json").write_text("\n".join(lines))
    issues, _ = _issues_for(root)
    text = [str(i) for i in issues]
    assert any("line 3" in t and "invalid JSON" in t for t in text)
    assert any("line 4" in t and '"target"' in t for t in text)
    assert any(t.startswith(str(root / "source" / "9.png")) and "missing pair" in t for t in text)
    assert any(t.startswith(str(root / "target" / "9.png")) for t in text)


def test_unreadable_image_is_named(tmp_path):
    root = write_dental(tmp_path / "d", count=3)
    bad = root / "target" / "upper_top_0002.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    issues, _ = _issues_for(root)
    assert [(i.path, "unreadable" in i.problem) for i in issues] == [(str(bad), True)]


def test_size_mismatch_inside_a_pair_is_named(tmp_path):
    root = write_dental(tmp_path / "d", count=3)
    src = root / "source" / "lower_left_0001.png"
    Image.new("RGB", (72, 64)).save(src)
    issues, _ = _issues_for(root)
    assert len(issues) == 1 and issues[0].path == str(src)
    assert "size mismatch" in issues[0].problem and "72x64" in issues[0].problem and "64x64" in issues[0].problem


def test_size_not_multiple_of_8_is_named(tmp_path):
    root = write_dental(tmp_path / "d", count=3)
    for folder in ("source", "target"):
        Image.new("RGB", (60, 64)).save(root / folder / "upper_top_0002.png")
    issues, _ = _issues_for(root)
    assert len(issues) == 1 and issues[0].path == str(root / "target" / "upper_top_0002.png")
    assert "not a multiple of 8" in issues[0].problem


def test_pairs_of_another_size_than_the_dataset_are_named(tmp_path):
    root = write_dental(tmp_path / "d", count=4)
    for folder in ("source", "target"):
        Image.new("RGB", (72, 72)).save(root / folder / "upper_top_0002.png")
    issues, _ = _issues_for(root)
    assert len(issues) == 1 and "differs from the dataset's 64x64" in issues[0].problem


def test_file_name_without_jaw_and_view_needs_a_sidecar(tmp_path):
    root = write_dental(tmp_path / "d", count=2)
    for folder in ("source", "target"):
        (root / folder / "upper_front_0000.png").rename(root / folder / "IMG_0007.png")
    issues, _ = _issues_for(root)
    assert len(issues) == 1 and issues[0].path == str(root / "target" / "IMG_0007.png")
    assert "no prompt" in issues[0].problem
    (root / "target" / "IMG_0007.txt").write_text("a molar")
    pairs, issues = check_dataset(root)
    assert issues == [] and {p.prompt for p in pairs if p.name == "IMG_0007.png"} == {"a molar"}


def test_skip_bad_keeps_the_good_pairs_and_lists_the_bad(tmp_path):
    root = write_dental(tmp_path / "d", count=5)
    (root / "target" / "upper_front_0000.png").unlink()
    (root / "source" / "upper_top_0002.png").write_bytes(b"not an image")
    pairs, issues = check_dataset(root, skip_bad=True)
    assert sorted(p.name for p in pairs) == ["lower_left_0001.png", "lower_right_0003.png", "upper_bottom_0004.png"]
    assert sorted(i.path.rsplit("/", 1)[1] for i in issues) == ["upper_front_0000.png", "upper_top_0002.png"]


def test_not_a_dataset_folder(tmp_path):
    issues, message = _issues_for(tmp_path)
    assert "prompt.json" in message and "source/" in message


def test_load_pair_ranges(tmp_path):
    root = write_dental(tmp_path / "d", count=1)
    pairs, _ = check_dataset(root)
    cond, target = load_pair(pairs[0])
    raw = np.asarray(Image.open(pairs[0].target), dtype=np.float32) / 255.0
    assert cond.shape == target.shape == (3, 64, 64)
    assert float(cond.min()) >= 0.0 and float(cond.max()) <= 1.0
    np.testing.assert_allclose(target.permute(1, 2, 0).numpy(), raw * 2 - 1, atol=1e-6)
    assert check_images(pairs, multiple=64)[1] == []


# ---------------------------------------------------------------- maps layout


def load_image_like_comfyui(path):
    """What ComfyUI's Load Image node outputs for a single-frame file: IMAGE [1, H, W, 3] float32 =
    RGB / 255 (EXIF orientation applied) and MASK [1, H, W] = 1 - alpha / 255, or 64x64 zeros without alpha."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        image = torch.from_numpy(np.array(img.convert("RGB")).astype(np.float32) / 255.0)[None]
        if "A" in img.getbands():
            mask = 1.0 - torch.from_numpy(np.array(img.getchannel("A")).astype(np.float32) / 255.0)
        else:
            mask = torch.zeros((64, 64), dtype=torch.float32)
    return image, mask[None]


@pytest.mark.parametrize("layout", ["folders", "folders_seg_alias", "flat", "flat_segmentation_prefix"])
def test_maps_layout_pairs_by_key_with_prompts_from_the_target_names(tmp_path, layout):
    flat = layout.startswith("flat")
    seg_name = "segmentation" if layout in ("folders", "flat_segmentation_prefix") else "seg"
    root = write_maps(tmp_path / "m", count=6, flat=flat, seg_name=seg_name)
    pairs, issues = check_dataset(root, blend=BLEND)
    assert issues == []
    assert sorted(p.name for p in pairs) == sorted(f"{key}.png" for key in MAP_KEYS)
    for pair in pairs:
        key = pair.target.stem
        lighting, seg = pair.maps
        assert pair.condition_files == pair.maps and pair.source == lighting
        assert lighting.name == (f"lighting_{key}.png" if flat else f"{key}.png")
        assert seg.name == (f"{seg_name}_{key}.png" if flat else f"{key}.png")
        assert pair.map_file("segmentation") == seg and pair.map_file("depth") is None
        assert pair.prompt == PromptTemplate().for_file(pair.target.name)
    by_name = {p.name: p for p in pairs}
    detail = PromptTemplate("{jaw}|{view}|{view_detail}")
    assert detail.for_file(by_name["upper_smith_front_top_left.png"].target.name) == "upper|front|top left"


def test_maps_layout_prefixes_inside_folders_and_target_prefix_in_a_flat_folder(tmp_path):
    root = write_maps(tmp_path / "m", count=2)
    for path in (root / "lighting").iterdir():
        path.rename(path.with_name("lighting_" + path.name))
    for path in (root / "segmentation").iterdir():
        path.rename(path.with_name("seg_" + path.name))
    pairs, issues = check_dataset(root, blend=BLEND)
    assert issues == [] and len(pairs) == 2
    flat = write_maps(tmp_path / "f", count=2, flat=True)
    (flat / f"{MAP_KEYS[0]}.png").rename(flat / f"target_{MAP_KEYS[0]}.png")
    pairs, issues = check_dataset(flat, blend=BLEND)
    assert issues == [] and sorted(p.target.name for p in pairs) == sorted([f"target_{MAP_KEYS[0]}.png",
                                                                             f"{MAP_KEYS[1]}.png"])


@pytest.mark.parametrize("flat", [False, True])
def test_maps_layout_names_every_missing_map_and_target(tmp_path, flat):
    root = write_maps(tmp_path / "m", count=4, flat=flat)
    where = {kind: (root if flat else root / kind) for kind in ("lighting", "segmentation", "target")}
    prefix = {kind: f"{kind}_" if flat else "" for kind in ("lighting", "segmentation")}
    k0, k1, k2, k3 = MAP_KEYS[:4]
    (where["lighting"] / f"{prefix['lighting']}{k0}.png").unlink()
    (where["segmentation"] / f"{prefix['segmentation']}{k0}.png").unlink()
    (where["segmentation"] / f"{prefix['segmentation']}{k1}.png").unlink()
    (where["target"] / f"{k2}.png").unlink()
    issues, message = _issues_for(root, blend=BLEND)
    found = sorted((i.path.rsplit("/", 1)[1], i.problem.split(":")[0], i.problem) for i in issues)
    assert [(name, kind) for name, kind, _ in found] == sorted([
        (f"{k0}.png", "missing map"), (f"{k0}.png", "missing map"), (f"{k1}.png", "missing map"),
        (f"{prefix['lighting']}{k2}.png", "missing target"), (f"{prefix['segmentation']}{k2}.png", "missing target")])
    problems = " ".join(problem for _, _, problem in found)
    assert f"no lighting map for this target, expected {'lighting_' if flat else 'lighting/'}{k0}.*" in problems
    assert f"{'seg_' if flat else 'segmentation/'}{k1}.*" in problems
    assert f"no target image with the key '{k2}'" in problems
    pairs, _ = check_dataset(root, blend=BLEND, skip_bad=True)
    assert [p.name for p in pairs] == [f"{k3}.png"]


def test_maps_layout_missing_or_doubled_map_folder(tmp_path):
    root = write_maps(tmp_path / "m", count=2, seg_name="seg")
    issues, message = _issues_for(root, blend=MapBlend.parse("lighting,depth"))
    assert [i.path for i in issues] == [str(root / "depth")] and "missing map folder: expected one of depth/" in message
    (root / "segmentation").mkdir()
    issues, message = _issues_for(root, blend=BLEND)
    assert "two folders of one map: expected one of segmentation/, seg/" in message


def test_maps_layout_unknown_prefix_counts_as_a_target_and_says_so(tmp_path):
    root = write_maps(tmp_path / "m", count=2, flat=True)
    Image.new("RGB", (64, 64)).save(root / "unlit_upper_smith_front_top_left.png")
    issues, _ = _issues_for(root, blend=BLEND)
    assert {i.path.rsplit("/", 1)[1] for i in issues} == {"unlit_upper_smith_front_top_left.png"}
    assert "a file with no map prefix is a target; maps: lighting, segmentation" in issues[0].problem


def test_maps_condition_is_byte_identical_to_the_blend_node_on_load_image_outputs(tmp_path):
    for rgba in (False, True):
        root = write_maps(tmp_path / f"m{rgba}", count=3, rgba=rgba)
        for alpha, mode in ((0.3, "alpha"), (0.55, "overlay"), (1.0, "soft_light")):
            blend = MapBlend.parse("lighting,seg", alpha, mode)
            pairs, _ = check_dataset(root, blend=blend)
            for pair in pairs:
                (lighting, lighting_mask), (seg, seg_mask) = (load_image_like_comfyui(p) for p in pair.maps)
                (node_built,) = CtrLoRABlendLightingSeg().blend(lighting, seg, alpha, mode, lighting_mask, seg_mask)
                trainer_built = load_condition(pair)
                assert trainer_built.dtype == np.float32 and node_built.dtype == torch.float32
                assert trainer_built.tobytes() == node_built[0].numpy().tobytes()


def test_transparent_renders_are_flattened_over_black_and_the_palette_background(tmp_path):
    opaque = write_maps(tmp_path / "opaque", count=1)
    transparent = write_maps(tmp_path / "rgba", count=1, rgba=True)
    (pair,) = check_dataset(transparent, blend=BLEND)[0]
    (reference,) = check_dataset(opaque, blend=BLEND)[0]
    condition = load_condition(pair)
    # the opaque maps have black lighting and the palette's background colour outside the teeth and gums
    assert np.array_equal(condition, load_condition(reference))
    assert np.allclose(condition[0, 0], 0.3 * 56 / 255, atol=1e-6)
    # the alpha channel is read: dropping it would leave black (the RGB under alpha 0) in the segmentation
    dropped = blend_lighting_seg(*(np.asarray(Image.open(p).convert("RGB"), np.float32) / 255 for p in pair.maps),
                                 0.3, "alpha")
    assert dropped[0, 0].max() == 0.0 and not np.array_equal(dropped, condition)


def test_maps_pairs_are_size_checked_map_by_map(tmp_path):
    root = write_maps(tmp_path / "m", count=3)
    seg = root / "segmentation" / f"{MAP_KEYS[1]}.png"
    Image.new("RGB", (72, 64)).save(seg)
    issues, _ = _issues_for(root, blend=BLEND)
    assert len(issues) == 1 and issues[0].path == str(seg) and "size mismatch" in issues[0].problem


def test_load_pair_of_the_maps_layout(tmp_path):
    root = write_maps(tmp_path / "m", count=1)
    (pair,) = check_dataset(root, blend=BLEND)[0]
    cond, target = load_pair(pair)
    expected = blend_lighting_seg(*(np.asarray(Image.open(p), np.float32) / 255 for p in pair.maps), 0.3, "alpha")
    assert torch.equal(cond, torch.from_numpy(expected).permute(2, 0, 1))
    assert target.shape == (3, 64, 64) and float(target.min()) >= -1.0


@pytest.mark.parametrize(("maps", "alpha", "mode", "problem"), [
    ("", 0.3, "alpha", "expected one or two map names, got 0"),
    ("lighting,segmentation,depth", 0.3, "alpha", "expected one or two map names, got 3"),
    ("seg,segmentation", 0.3, "alpha", "a map is named twice"),
    ("lighting,target", 0.3, "alpha", "not 'target'"),
    ("light ing", 0.3, "alpha", "words of letters"),
    ("lighting,seg", 1.5, "alpha", "--blend-alpha must be in [0, 1], got 1.5"),
    ("lighting,seg", 0.3, "lighten", "--blend-mode must be one of alpha, multiply"),
])
def test_map_blend_refuses_bad_options(maps, alpha, mode, problem):
    with pytest.raises(CtrLoRAError, match=f"--maps {maps!r}: .*{re.escape(problem)}"):
        MapBlend.parse(maps, alpha, mode)


def test_map_names_and_aliases():
    blend = MapBlend.parse(" Lighting , SEG ")
    assert blend.maps == ("lighting", "segmentation") and (blend.alpha, blend.mode) == (0.3, "alpha")
    assert blend.names_of("segmentation") == ("segmentation", "seg")
    assert blend.background("segmentation") == (56, 56, 56) and blend.background("lighting") == (0, 0, 0)
    assert MapBlend.parse("lighting").maps == ("lighting",)


def test_without_maps_a_maps_folder_is_refused_with_a_hint(tmp_path):
    root = write_maps(tmp_path / "m", count=1, flat=True)
    issues, message = _issues_for(root)
    assert "pass --maps (e.g. --maps lighting,segmentation)" in message


def test_pairs_are_refused_from_headers_and_each_kept_image_is_decoded_once(tmp_path, monkeypatch):
    root = write_dental(tmp_path / "d", count=6)
    Image.new("RGB", (72, 64)).save(root / "source" / "lower_left_0001.png")  # size mismatch
    (root / "source" / "upper_top_0002.png").write_bytes(b"not an image")
    cut = root / "target" / "lower_right_0003.png"
    cut.write_bytes(cut.read_bytes()[:200])  # a cut-off PNG: its header is fine, its data is not
    decoded = Counter()
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        if self.tile:  # pixel data still to decode (a later load() of the same image is free)
            decoded[Path(self.filename).relative_to(root).as_posix()] += 1
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    pairs, issues = check_dataset(root, skip_bad=True)
    assert sorted(Path(i.path).relative_to(root).as_posix() for i in issues) == [
        "source/lower_left_0001.png", "source/upper_top_0002.png", "target/lower_right_0003.png"]
    assert decoded == {}  # checking decodes nothing, so a refused pair is never decoded
    for pair in pairs:
        load_pair(pair)
    kept = [Path(p).relative_to(root).as_posix() for pair in pairs for p in (pair.source, pair.target)]
    assert len(kept) == 6 and decoded == {name: 1 for name in kept}


def test_damage_only_decoding_shows_names_the_file_when_it_is_decoded(tmp_path):
    root = write_dental(tmp_path / "d", count=2)
    target = root / "target" / "upper_front_0000.png"
    Image.open(target).convert("RGB").save(target.with_suffix(".jpg"), quality=95)
    target.unlink()
    jpeg = target.with_suffix(".jpg")
    jpeg.write_bytes(jpeg.read_bytes()[:-200])  # a cut-off JPEG has no checksums to verify
    pairs, issues = check_dataset(root)
    assert issues == [] and len(pairs) == 2
    with pytest.raises(ConditionError, match="cannot read image") as err:
        load_pair(next(p for p in pairs if p.target == jpeg))
    assert str(jpeg) in str(err.value)
