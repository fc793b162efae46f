"""Where the loaders find their files: `models/ctrlora`, plus the CtrLoRA files in `models/controlnet`.

The pack registers the folder name "ctrlora" with ComfyUI (`models/ctrlora` under the
models directory, or more paths from extra_model_paths.yaml). Users who followed the
Advanced-ControlNet instructions keep CtrLoRA files in `models/controlnet`; those are
listed too, but only the ones that are CtrLoRA files, so the loaders do not offer
every plain ControlNet:

- a `.safetensors` file there is listed when its header says it is a CtrLoRA base
  (for the base loader) or a CtrLoRA LoRA (for the LoRA loader); only the JSON header
  is read, and the answer is cached per (path, size, mtime);
- a pickle (`.ckpt`, ...) there cannot be classified without loading it, so it is
  listed when its name contains "ctrlora" (the official files are named so).

Every file of `models/ctrlora` is listed by both loaders; picking the wrong kind gives
a clear error when the node runs. A name is resolved in `ctrlora` first, then in
`controlnet`, which is also the order the web panel asks `/ctrlora/info` in.

`folder_paths` (ComfyUI's module) is passed in or imported lazily, so this module
imports without ComfyUI.
"""
from __future__ import annotations

import os
from typing import Any

from ..ctrlora_core.describe import describe
from ..ctrlora_core.errors import CheckpointError
from ..ctrlora_core.files import file_stamp
from ..ctrlora_core.formats import PICKLE_EXTENSIONS, SAFETENSORS_EXTENSIONS, FileKind

FOLDER = "ctrlora"
CONTROLNET_FOLDER = "controlnet"
MODEL_EXTENSIONS = set(SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS)

# real path -> (file stamp, kind): one entry per file, replaced when the file changes
_kind_cache: dict[str, tuple[tuple[str, int, int], str | None]] = {}


def _folder_paths() -> Any:
    import folder_paths  # ComfyUI's module; only present inside ComfyUI

    return folder_paths


def register_folder(folder_paths: Any = None) -> None:
    """Make "ctrlora" a ComfyUI model folder (idempotent; keeps paths added by extra_model_paths.yaml)."""
    fp = folder_paths or _folder_paths()
    default = os.path.join(fp.models_dir, FOLDER)
    if FOLDER in fp.folder_names_and_paths:
        paths, extensions = fp.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.insert(0, default)
        extensions.update(MODEL_EXTENSIONS)
    else:
        fp.folder_names_and_paths[FOLDER] = ([default], set(MODEL_EXTENSIONS))


def _header_kind(path: str) -> str | None:
    """Kind (FileKind value) of a .safetensors file from its header, None when unreadable; cached."""
    try:
        stamp = file_stamp(path)
    except OSError:  # gone since it was listed
        return None
    cached = _kind_cache.get(stamp[0])
    if cached is None or cached[0] != stamp:
        try:
            kind = describe(path)["kind"]
        except (CheckpointError, OSError, KeyError, TypeError, ValueError):
            kind = None
        cached = _kind_cache[stamp[0]] = (stamp, kind)
    return cached[1]


def _is_ctrlora_file(path: str, name: str, kind: FileKind) -> bool:
    ext = os.path.splitext(name)[1].lower()
    if ext in SAFETENSORS_EXTENSIONS:
        return _header_kind(path) == kind.value
    return ext in PICKLE_EXTENSIONS and "ctrlora" in os.path.basename(name).lower()


def list_files(kind: FileKind, folder_paths: Any = None) -> list[str]:
    """File names the loader for `kind` offers: all of models/ctrlora, CtrLoRA files of models/controlnet."""
    fp = folder_paths or _folder_paths()
    register_folder(fp)
    names = [n for n in fp.get_filename_list(FOLDER) if os.path.splitext(n)[1].lower() in MODEL_EXTENSIONS]
    seen = set(names)
    if CONTROLNET_FOLDER in fp.folder_names_and_paths:
        for name in fp.get_filename_list(CONTROLNET_FOLDER):
            if name in seen:
                continue
            path = fp.get_full_path(CONTROLNET_FOLDER, name)
            if path and _is_ctrlora_file(path, name, kind):
                names.append(name)
                seen.add(name)
    return sorted(names)


def resolve(name: str, folder_paths: Any = None) -> str:
    """Full path of a listed name (models/ctrlora first, then models/controlnet)."""
    fp = folder_paths or _folder_paths()
    register_folder(fp)
    for folder in (FOLDER, CONTROLNET_FOLDER):
        if folder in fp.folder_names_and_paths:
            path = fp.get_full_path(folder, name)
            if path:
                return path
    raise CheckpointError(f"model file {name!r} not found in models/{FOLDER} or models/{CONTROLNET_FOLDER}")


def output_path(save_name: str, folder_paths: Any = None) -> str:
    """Where the blend node writes `save_name`: the first models/ctrlora path, '.safetensors' appended.

    Sub-folders are allowed; absolute names and '..' are refused.
    """
    fp = folder_paths or _folder_paths()
    register_folder(fp)
    name = save_name.strip().replace("\\", "/")
    parts = name.split("/")
    if not name or name.startswith("/") or os.path.splitdrive(name)[0] or ".." in parts or "" in parts:
        raise ValueError(f"save_name {save_name!r}: expected a relative file name such as 'my_blend' "
                         "(sub-folders allowed, no '..')")
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    root = fp.folder_names_and_paths[FOLDER][0][0]
    return os.path.join(root, *name.split("/"))
