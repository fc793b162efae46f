"""Dataset layouts, prompts from file names, and validation: every bad case is reported by file name."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from ctrlora_core.conditions import ConditionError
from ctrlora_core.prompts import PromptTemplate
from train_data import write_dental, write_official
from train.dataset import DatasetError, check_dataset, find_pairs, load_pair, check_images


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
