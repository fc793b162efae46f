"""Training pairs (condition image, target image, prompt): the three folder layouts and their validation.

Layouts of a dataset folder ROOT:

1. official: `ROOT/prompt.json` lists the pairs, either as JSON Lines (one object per line)
   or as one JSON array, each entry `{"source": "source/0.png", "target": "target/0.png",
   "prompt": "..."}` with paths relative to ROOT;
2. dental (no prompt.json): `ROOT/source/` and `ROOT/target/` hold images with matching
   file names (the extension may differ). The prompt of a pair is the text of a sidecar
   `<stem>.txt` next to the target (or the source) image if there is one, otherwise it is
   made from the file name by the prompt template (`upper_front_0001.png` ->
   "a 3D dental model of upper teeth, front view, ...", see `ctrlora_core.prompts`);
3. maps (chosen with `MapBlend`, the trainer's --maps): the condition is made from one or two
   maps per sample, e.g. a lighting and a segmentation map, blended with exactly the function
   of the Blend Lighting + Segmentation node (`blend_lighting_seg`, first map = base layer).
   Either one sub-folder per map plus target/ (`lighting/<key>.png`, `segmentation/<key>.png`
   or `seg/<key>.png`, `target/<key>.png`), or all files in ROOT with the map name as prefix
   (`lighting_<key>.png`, `seg_<key>.png` or `segmentation_<key>.png`; targets `<key>.png` or
   `target_<key>.png`). In sub-folders the prefix is optional. Files are matched by key;
   prompts come from the target's name (or its sidecar) as in the dental layout. A
   transparent map is flattened first (`ctrlora_core.conditions.load_map`): the
   segmentation over the palette background, any other map over black.

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

from ctrlora_core.conditions import (
    BLEND_MODES,
    DENTAL_BLEND_ALPHA,
    DENTAL_PALETTE,
    RGB8,
    blend_lighting_seg,
    load_image,
    load_map,
)
from ctrlora_core.errors import CtrLoRAError
from ctrlora_core.prompts import PromptError, PromptTemplate, read_sidecar_prompt

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
PROMPT_FILE = "prompt.json"
SEGMENTATION = "segmentation"
MAP_ALIASES = {"seg": SEGMENTATION}  # another name of a map (folder and prefix) -> the map
TARGET = "target"


@dataclass(frozen=True)
class MapBlend:
    """The maps layout's condition: maps in blend order (first = base layer), `blend_lighting_seg`'s
    alpha and mode, and the colour a transparent segmentation map is flattened over."""

    maps: tuple[str, ...]
    alpha: float = DENTAL_BLEND_ALPHA
    mode: str = "alpha"
    seg_background: RGB8 = DENTAL_PALETTE["background"]

    @classmethod
    def parse(cls, maps: str, alpha: float = DENTAL_BLEND_ALPHA, mode: str = "alpha",
              seg_background: RGB8 = DENTAL_PALETTE["background"]) -> "MapBlend":
        """From the --maps text ("lighting,segmentation"; "seg" = "segmentation"), checked."""
        names = tuple(MAP_ALIASES.get(n, n) for n in (n.strip().lower() for n in maps.split(",")) if n)
        problems = [msg for ok, msg in (
            (1 <= len(names) <= 2, f"expected one or two map names, got {len(names)}"),
            (len(set(names)) == len(names), "a map is named twice"),
            (all(n.isidentifier() and n.isascii() and n != TARGET for n in names),
             "map names are words of letters, digits and '_', and not 'target'"),
            (0.0 <= alpha <= 1.0, f"--blend-alpha must be in [0, 1], got {alpha}"),
            (mode in BLEND_MODES, f"--blend-mode must be one of {', '.join(BLEND_MODES)}, got {mode!r}"),
        ) if not ok]
        if problems:
            raise CtrLoRAError(f"--maps {maps!r}: " + "; ".join(problems))
        return cls(names, alpha, mode, seg_background)

    def names_of(self, map_name: str) -> tuple[str, ...]:
        """The folder names and file prefixes of a map: its name and its aliases."""
        return (map_name, *sorted(alias for alias, name in MAP_ALIASES.items() if name == map_name))

    def background(self, map_name: str) -> RGB8:
        """The colour a transparent map is flattened over."""
        return self.seg_background if map_name == SEGMENTATION else (0, 0, 0)


@dataclass(frozen=True)
class Pair:
    """One training example; `name` identifies it in messages and reports.

    `source` is the condition image; in the maps layout it is the first map, `maps` holds
    the files of `blend.maps` in that order and the condition is made by `load_condition`.
    """

    name: str
    source: Path
    target: Path
    prompt: str
    maps: tuple[Path, ...] = ()
    blend: MapBlend | None = None

    @property
    def condition_files(self) -> tuple[Path, ...]:
        """The files the condition is made of."""
        return self.maps or (self.source,)

    def map_file(self, map_name: str) -> Path | None:
        """The file of one map of the maps layout (None when the pair has no such map)."""
        if self.blend is None or map_name not in self.blend.maps:
            return None
        return self.maps[self.blend.maps.index(map_name)]


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


def find_pairs(root: str | os.PathLike, template: PromptTemplate | None = None,
               blend: MapBlend | None = None) -> tuple[list[Pair], list[Issue]]:
    """Read the pairs of a dataset folder without opening images: the maps layout when `blend`
    is given, else the official or the dental layout."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError([Issue(str(root), "dataset folder does not exist")], root)
    if blend is not None:
        return _maps_pairs(root, template or PromptTemplate(), blend)
    if (root / PROMPT_FILE).is_file():
        return _official_pairs(root)
    if (root / "source").is_dir() and (root / "target").is_dir():
        return _dental_pairs(root, template or PromptTemplate())
    raise DatasetError([Issue(str(root), f"expected {PROMPT_FILE} (official layout), the folders source/ and "
                                         "target/ (dental layout), or pass --maps (e.g. --maps lighting,segmentation) "
                                         "for map folders or prefixed map files (maps layout)")], root)


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
            prompt = _target_prompt(target, template, (source,))
        except PromptError as err:
            issues.append(Issue(str(target), f"no prompt: no sidecar {stem}.txt and {err}"))
            continue
        pairs.append(Pair(target.name, source, target, prompt))
    return pairs, issues


def _target_prompt(target: Path, template: PromptTemplate, others: tuple[Path, ...] = ()) -> str:
    """The sidecar prompt of the target (or of the other files, in order), else the template's."""
    for path in (target, *others):
        prompt = read_sidecar_prompt(path)
        if prompt is not None:
            return prompt
    return template.for_file(target.name)


def _key(stem: str, prefixes: tuple[str, ...]) -> str | None:
    """`stem` without a leading '<prefix>_' (case ignored); None when it has none of them."""
    for prefix in prefixes:
        if stem.lower().startswith(prefix + "_") and len(stem) > len(prefix) + 1:
            return stem[len(prefix) + 1:]
    return None


def _add_keyed(found: dict[str, Path], key: str, path: Path, issues: list[Issue]) -> None:
    if key in found:
        issues.append(Issue(str(path), f"ambiguous: {found[key].name} has the same key {key!r}"))
    else:
        found[key] = path


def _image_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def _maps_files(root: Path, blend: MapBlend) -> tuple[dict[str, dict[str, Path]], list[Issue], bool]:
    """({"target" or map name: {key: file}}, issues, whether ROOT holds one folder per map)."""
    roles = (TARGET, *blend.maps)
    names = {role: (TARGET,) if role == TARGET else blend.names_of(role) for role in roles}
    files: dict[str, dict[str, Path]] = {role: {} for role in roles}
    issues: list[Issue] = []
    if not (root / TARGET).is_dir():  # one flat folder: maps carry their prefix, targets none or target_
        for path in _image_files(root):
            role, key = next(((r, k) for r in roles if (k := _key(path.stem, names[r]))), (TARGET, path.stem))
            _add_keyed(files[role], key, path, issues)
        return files, issues, False
    folders = {role: [root / name for name in names[role] if (root / name).is_dir()] for role in roles}
    bad = [Issue(str(root / role), f"{'two folders of one map' if found else 'missing map folder'}: expected "
                                   f"one of {', '.join(n + '/' for n in names[role])} next to target/")
           for role, found in folders.items() if len(found) != 1]
    if bad:
        raise DatasetError(bad, root)
    for role, (folder,) in folders.items():  # in a map's folder the prefix is optional
        for path in _image_files(folder):
            _add_keyed(files[role], _key(path.stem, names[role]) or path.stem, path, issues)
    return files, issues, True


def _maps_pairs(root: Path, template: PromptTemplate, blend: MapBlend) -> tuple[list[Pair], list[Issue]]:
    files, issues, in_folders = _maps_files(root, blend)
    targets = files[TARGET]
    for map_name in blend.maps:
        for key in sorted(set(files[map_name]) - set(targets)):
            issues.append(Issue(str(files[map_name][key]), f"missing target: no target image with the key {key!r}"))
    pairs = []
    for key, target in sorted(targets.items()):
        missing = [m for m in blend.maps if key not in files[m]]
        hint = "" if in_folders else f" (a file with no map prefix is a target; maps: {', '.join(blend.maps)})"
        for map_name in missing:
            expected = [f"{map_name}/{key}.*"] if in_folders else [f"{n}_{key}.*" for n in blend.names_of(map_name)]
            issues.append(Issue(str(target), f"missing map: no {map_name} map for this target, expected "
                                             f"{' or '.join(expected)}{hint}"))
        if missing:
            continue
        maps = tuple(files[m][key] for m in blend.maps)
        try:
            prompt = _target_prompt(target, template, maps)
        except PromptError as err:
            issues.append(Issue(str(target), f"no prompt: no sidecar {target.stem}.txt and {err}"))
            continue
        pairs.append(Pair(target.name, maps[0], target, prompt, maps, blend))
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

    Checked: readable, the condition files (source or maps) and the target of the same size,
    sizes multiples of `multiple`, and one size for the whole dataset (the most common one;
    a batch needs equal sizes).
    """
    issues: list[Issue] = []
    sized: list[tuple[Pair, tuple[int, int]]] = []
    for pair in pairs:
        files = (*pair.condition_files, pair.target)
        sizes = {}
        for path in files:
            size = image_size(path)
            if isinstance(size, str):
                issues.append(Issue(str(path), size))
            else:
                sizes[path] = size
        if len(sizes) < len(files):
            continue
        tgt = sizes[pair.target]
        mismatched = [path for path in pair.condition_files if sizes[path] != tgt]
        for path in mismatched:
            src = sizes[path]
            issues.append(Issue(str(path), f"size mismatch: source is {src[0]}x{src[1]}, "
                                           f"target {pair.target.name} is {tgt[0]}x{tgt[1]}"))
        if mismatched:
            continue
        src = tgt
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
                  multiple: int = 8, blend: MapBlend | None = None) -> tuple[list[Pair], list[Issue]]:
    """find_pairs + check_images; raise DatasetError on any issue unless skip_bad (then drop them)."""
    pairs, issues = find_pairs(root, template, blend)
    good, more = check_images(pairs, multiple)
    issues += more
    if issues and not skip_bad:
        raise DatasetError(issues, root)
    if not good:
        raise DatasetError(issues + [Issue(os.fspath(root), "no usable pairs")], root)
    return good, issues


def load_condition(pair: Pair) -> np.ndarray:
    """The condition image, float32 HWC in [0, 1]: the source file, or the blend of the pair's maps
    (flattened as `MapBlend.background` says), computed as the Blend Lighting + Segmentation node does."""
    if pair.blend is None:
        return load_image(pair.source)
    maps = [load_map(path, pair.blend.background(name)) for name, path in zip(pair.blend.maps, pair.maps)]
    if len(maps) == 1:
        return maps[0]
    return blend_lighting_seg(maps[0], maps[1], pair.blend.alpha, pair.blend.mode)


def load_pair(pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    """(condition [3, H, W] in [0, 1], target [3, H, W] in [-1, 1]) float32, as the official loader.

    The one decode of the pair's images; a file that cannot be decoded raises ConditionError naming it.
    """
    source = torch.from_numpy(np.ascontiguousarray(load_condition(pair))).permute(2, 0, 1)
    target = torch.from_numpy(np.ascontiguousarray(load_image(pair.target))).permute(2, 0, 1)
    return source, target * 2.0 - 1.0
