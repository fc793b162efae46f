"""Training pairs (condition image, target image, prompt): the two folder layouts and their validation.

Layouts of a dataset folder ROOT:

1. official: `ROOT/prompt.json` lists the pairs, either as JSON Lines (one object per line)
   or as one JSON array, each entry `{"source": "source/0.png", "target": "target/0.png",
   "prompt": "..."}` with paths relative to ROOT;
2. dental (no prompt.json): `ROOT/source/` and `ROOT/target/` hold images with matching
   file names (the extension may differ). The prompt of a pair is the text of a sidecar
   `<stem>.txt` next to the target (or the source) image if there is one, otherwise it is
   made from the file name by the prompt template (`upper_front_0001.png` ->
   "a 3D dental model of upper teeth, front view, ...", see `ctrlora_core.prompts`).

`find_pairs` reads a layout; `check_images` reads every image's header (size) without
decoding its pixels, so a pair is refused or skipped before it is decoded and each image of
a kept pair is decoded once, by `load_pair` when it is encoded. A PNG's chunk checksums are
verified in the check too (a cut-off or damaged PNG is refused there); damage that only
decoding shows (a cut-off JPEG) stops the run when the file is decoded, naming it. Every
problem is collected as an `Issue` naming the file, so a user sees all of them at once, and
`check_dataset` either raises `DatasetError` listing them or (skip_bad) drops the offending pairs.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ctrlora_core.conditions import load_image
from ctrlora_core.errors import CtrLoRAError
from ctrlora_core.prompts import PromptError, PromptTemplate, read_sidecar_prompt

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
PROMPT_FILE = "prompt.json"


@dataclass(frozen=True)
class Pair:
    """One training example; `name` identifies it in messages and reports."""

    name: str
    source: Path
    target: Path
    prompt: str


@dataclass(frozen=True)
class Issue:
    """Something wrong with one file (or one prompt.json entry)."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class DatasetError(CtrLoRAError):
    """The dataset has problems; `issues` lists every one."""

    def __init__(self, issues: list[Issue], root: str | os.PathLike):
        self.issues = issues
        lines = "\n".join(f"  - {issue}" for issue in issues)
        super().__init__(f"dataset {os.fspath(root)}: {len(issues)} problem(s):\n{lines}\n"
                         "Fix them, or pass --skip-bad to train on the remaining pairs.")


def find_pairs(root: str | os.PathLike, template: PromptTemplate | None = None) -> tuple[list[Pair], list[Issue]]:
    """Read the pairs of a dataset folder (either layout) without opening images."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError([Issue(str(root), "dataset folder does not exist")], root)
    if (root / PROMPT_FILE).is_file():
        return _official_pairs(root)
    if (root / "source").is_dir() and (root / "target").is_dir():
        return _dental_pairs(root, template or PromptTemplate())
    raise DatasetError([Issue(str(root), f"expected {PROMPT_FILE} (official layout) or the folders "
                                         "source/ and target/ (dental layout)")], root)


def _read_entries(path: Path) -> tuple[list[tuple[str, object]], list[Issue]]:
    """prompt.json entries as (where, value): a JSON array or JSON Lines."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            return [], [Issue(str(path), f"invalid JSON array: {err}")]
        return [(f"{path} entry {i}", item) for i, item in enumerate(items)], []
    entries, issues = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            issues.append(Issue(f"{path} line {number}", f"invalid JSON: {err}"))
    return entries, issues


def _official_pairs(root: Path) -> tuple[list[Pair], list[Issue]]:
    entries, issues = _read_entries(root / PROMPT_FILE)
    pairs = []
    for where, entry in entries:
        fields = ("source", "target", "prompt")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in fields):
            issues.append(Issue(where, 'expected an object with string fields "source", "target" and "prompt"'))
            continue
        source, target = root / entry["source"], root / entry["target"]
        missing = [p for p in (source, target) if not p.is_file()]
        for path in missing:
            issues.append(Issue(str(path), f"missing pair: file listed in {where} does not exist"))
        if not missing:
            pairs.append(Pair(entry["target"], source, target, entry["prompt"]))
    return pairs, issues


def _images_by_stem(folder: Path) -> tuple[dict[str, Path], list[Issue]]:
    found: dict[str, Path] = {}
    issues = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem in found:
            issues.append(Issue(str(path), f"ambiguous: {found[path.stem].name} has the same name"))
            continue
        found[path.stem] = path
    return found, issues


def _dental_pairs(root: Path, template: PromptTemplate) -> tuple[list[Pair], list[Issue]]:
    sources, issues = _images_by_stem(root / "source")
    targets, target_issues = _images_by_stem(root / "target")
    issues += target_issues
    for stem in sorted(set(sources) - set(targets)):
        issues.append(Issue(str(sources[stem]), "missing pair: no target image with this name in target/"))
    for stem in sorted(set(targets) - set(sources)):
        issues.append(Issue(str(targets[stem]), "missing pair: no source image with this name in source/"))
    pairs = []
    for stem in sorted(set(sources) & set(targets)):
        source, target = sources[stem], targets[stem]
        try:
            prompt = read_sidecar_prompt(target)
            if prompt is None:
                prompt = read_sidecar_prompt(source)
            if prompt is None:
                prompt = template.for_file(target.name)
        except PromptError as err:
            issues.append(Issue(str(target), f"no prompt: no sidecar {stem}.txt and {err}"))
            continue
        pairs.append(Pair(target.name, source, target, prompt))
    return pairs, issues


def image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) from the image's header, or the reason it cannot be read; no pixel is decoded.

    `verify` checks what the format allows without decoding (a PNG's chunk checksums).
    """
    try:
        with Image.open(path) as img:
            img.verify()
            return img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL: SyntaxError = bad chunk
        return f"unreadable image ({err})"


def check_images(pairs: list[Pair], multiple: int = 8) -> tuple[list[Pair], list[Issue]]:
    """Read every image's header; return the good pairs and the issues of the bad ones.

    Checked: readable, source and target of the same size, sizes multiples of `multiple`,
    and one size for the whole dataset (the most common one; a batch needs equal sizes).
    """
    issues: list[Issue] = []
    sized: list[tuple[Pair, tuple[int, int]]] = []
    for pair in pairs:
        sizes = {}
        for path in (pair.source, pair.target):
            size = image_size(path)
            if isinstance(size, str):
                issues.append(Issue(str(path), size))
            else:
                sizes[path] = size
        if len(sizes) < 2:
            continue
        src, tgt = sizes[pair.source], sizes[pair.target]
        if src != tgt:
            issues.append(Issue(str(pair.source), f"size mismatch: source is {src[0]}x{src[1]}, "
                                                  f"target {pair.target.name} is {tgt[0]}x{tgt[1]}"))
            continue
        if src[0] % multiple or src[1] % multiple:
            issues.append(Issue(str(pair.target), f"size {src[0]}x{src[1]} is not a multiple of {multiple} "
                                                  "(resize or crop the pair)"))
            continue
        sized.append((pair, src))
    if not sized:
        return [], issues
    common = Counter(size for _, size in sized).most_common(1)[0][0]
    good = []
    for pair, size in sized:
        if size != common:
            issues.append(Issue(str(pair.target), f"size {size[0]}x{size[1]} differs from the dataset's "
                                                  f"{common[0]}x{common[1]} (all pairs must share one size)"))
        else:
            good.append(pair)
    return good, issues


def check_dataset(root: str | os.PathLike, template: PromptTemplate | None = None, skip_bad: bool = False,
                  multiple: int = 8) -> tuple[list[Pair], list[Issue]]:
    """find_pairs + check_images; raise DatasetError on any issue unless skip_bad (then drop them)."""
    pairs, issues = find_pairs(root, template)
    good, more = check_images(pairs, multiple)
    issues += more
    if issues and not skip_bad:
        raise DatasetError(issues, root)
    if not good:
        raise DatasetError(issues + [Issue(os.fspath(root), "no usable pairs")], root)
    return good, issues


def load_pair(pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    """(condition [3, H, W] in [0, 1], target [3, H, W] in [-1, 1]) float32, as the official loader.

    The one decode of the pair's images; a file that cannot be decoded raises ConditionError naming it.
    """
    source = torch.from_numpy(np.ascontiguousarray(load_image(pair.source))).permute(2, 0, 1)
    target = torch.from_numpy(np.ascontiguousarray(load_image(pair.target))).permute(2, 0, 1)
    return source, target * 2.0 - 1.0
