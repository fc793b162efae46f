"""Reading and writing CtrLoRA files: official `.ckpt`/`.safetensors` and our own LoRA files.

Reading never executes pickled code: `.safetensors` through safetensors, pickles only
through `torch.load(..., weights_only=True)`. Every problem raises `CheckpointError`
naming the file and what was expected.

A file's kind is decided from its key names before any tensor data is read
(`scan_file`): the JSON header of a .safetensors file, the key table of a pickle opened
with `mmap=True` (tensor data stays on disk until touched). A wrong file is refused
at the cost of its header (`require_kind`), and a right one reads only the tensors it
needs. A legacy pickle (torch.save before torch 1.6, not a zip archive) cannot be
memory-mapped: torch reads it whole, so refusing one costs its size once (convert it to
.safetensors with `python -m ctrlora_core.convert`). Kinds:

- CtrLoRA base: a ControlNet trunk whose first conv takes the 4-channel latent, no hint
  block (official files also carry leftover `lora_layer` tensors, ignored for the base);
- CtrLoRA LoRA: only `lora_layer`, zero-conv and attention-norm tensors (246 for SD1.5);
- plain ControlNet (has `input_hint_block`), SD checkpoint (`model.diffusion_model.`),
  ordinary SD LoRA (kohya/diffusers), or unknown.

A full training checkpoint (SD + `control_model.` keys) is accepted: its control part is used.

On any error nothing read stays referenced: the loading functions are wrapped in
`release_on_error`, so a kept exception holds its message, not the frames' tensors.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapters import LORA_DOWN, CtrLoRAAdapter, check_adapter_shapes, is_adapter_key
from .config import SD15_NUM_HEADS, infer_config
from .controlnet import CtrLoRAControlNet
from .errors import CheckpointError, release_on_error
from .files import atomic_write, read_safetensors_header

CONTROL_PREFIX = "control_model."
SD_UNET_PREFIX = "model.diffusion_model."
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
FORMAT_NAME = "ctrlora-lora"
FORMAT_VERSION = "1"


class FileKind(str, Enum):
    CTRLORA_BASE = "CtrLoRA base ControlNet"
    CTRLORA_LORA = "CtrLoRA condition LoRA"
    CONTROLNET = "plain ControlNet (has a hint block; not a CtrLoRA base)"
    SD_CHECKPOINT = "Stable Diffusion checkpoint"
    SD_LORA = "ordinary SD LoRA (kohya/diffusers keys; not a CtrLoRA condition LoRA)"
    UNKNOWN = "unknown"


@dataclass
class FileSummary:
    """What a model file holds, known from its header or key table alone."""

    path: str
    kind: FileKind
    shapes: dict[str, tuple[int, ...]]  # un-prefixed control keys for CtrLoRA kinds, raw keys otherwise
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    prefix: str = ""  # what the file's keys carry before the keys in `shapes`


def _check_path(path: str) -> str:
    """The lower-case extension of an existing, non-empty regular file; raises otherwise."""
    if not os.path.exists(path):
        raise CheckpointError("file does not exist", path)
    if not os.path.isfile(path):
        raise CheckpointError("is not a regular file", path)
    if os.path.getsize(path) == 0:
        raise CheckpointError("file is empty (0 bytes)", path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS:
        raise CheckpointError(
            f"unsupported extension {ext!r}; expected one of {SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS}", path)
    return ext


def _open_pickle(path: str) -> Mapping[str, Any]:
    """The flat key -> value dict of a pickle (a `state_dict` wrapper unwrapped), memory-mapped when possible.

    Files written by torch.save's zip format (every torch since 1.6) are mapped: reading
    them reads the key table, and tensor data comes from disk only when a tensor is used.
    Legacy files (not zip archives) cannot be mapped and are read whole.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            "refusing to load: the pickle needs code or objects beyond plain tensors "
            f"(only weights_only loading is allowed; convert it to .safetensors): {first_line}", path) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"not a readable torch checkpoint (truncated or corrupt?): {e}", path) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict of tensors, found {type(obj).__name__}", path)
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"expected only tensors, but {len(bad)} entries are not, e.g. {bad[:3]}", path)
    return obj


def _raw_shapes(path: str, ext: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    if ext in SAFETENSORS_EXTENSIONS:
        header, metadata = read_safetensors_header(path)
        return {k: tuple(v["shape"]) for k, v in header.items()}, metadata
    return {k: tuple(v.shape) for k, v in _open_pickle(path).items()}, {}


def classify(keys: Iterable[str]) -> tuple[FileKind, str, list[str]]:
    """(kind, key prefix of the relevant part, notes) from a file's raw key names."""
    keys = list(keys)
    notes: list[str] = []
    control = [k[len(CONTROL_PREFIX):] for k in keys if k.startswith(CONTROL_PREFIX)]
    prefix = CONTROL_PREFIX if control else ""
    if control:
        if len(control) < len(keys):
            notes.append(f"full checkpoint: using its {len(control)} control_model tensors, "
                         f"ignoring {len(keys) - len(control)} others")
    elif any(k.startswith(SD_UNET_PREFIX) for k in keys):
        return FileKind.SD_CHECKPOINT, "", notes
    else:
        control = keys
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora.down." in k for k in control):
        return FileKind.SD_LORA, prefix, notes
    if any(k.startswith("input_hint_block.") for k in control):
        return FileKind.CONTROLNET, prefix, notes
    if any(k.startswith("output_blocks.") for k in control):
        return FileKind.SD_CHECKPOINT, prefix, notes
    if "input_blocks.0.0.weight" in control:
        return FileKind.CTRLORA_BASE, prefix, notes
    if any(k.endswith(LORA_DOWN) for k in control) and all(is_adapter_key(k) for k in control):
        return FileKind.CTRLORA_LORA, prefix, notes
    return FileKind.UNKNOWN, prefix, notes


@release_on_error
def scan_file(path: str | os.PathLike) -> FileSummary:
    """Kind, shapes and metadata of a model file, without reading tensor data."""
    path = os.fspath(path)
    shapes, metadata = _raw_shapes(path, _check_path(path))
    if not shapes:
        raise CheckpointError("contains no tensors", path)
    kind, prefix, notes = classify(shapes)
    relevant = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
    return FileSummary(path, kind, relevant, metadata, notes, prefix)


@release_on_error
def read_tensors(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The raw tensors of a model file (only `keys` when given), as independent CPU tensors."""
    path = os.fspath(path)
    ext = _check_path(path)
    try:
        if ext in SAFETENSORS_EXTENSIONS:
            with safe_open(path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in (f.keys() if keys is None else keys)}
        stored = _open_pickle(path)
        # clone: a tensor that stays a view of the memory map would keep the file mapped
        return {k: stored[k].clone() for k in (stored if keys is None else keys)}
    except (SafetensorError, OSError, KeyError) as e:
        raise CheckpointError(f"not a readable model file (truncated or corrupt?): {e}", path) from None


@release_on_error
def require_kind(path: str | os.PathLike, expected: FileKind) -> FileSummary:
    """The summary of `path` if its header says it is of the `expected` kind; CheckpointError otherwise."""
    summary = scan_file(path)
    if summary.kind != expected:
        sample = ", ".join(summary.prefix + k for k in list(summary.shapes)[:3])
        raise CheckpointError(f"this is a {summary.kind.value} file, but a {expected.value} was expected "
                              f"(first keys: {sample})", summary.path)
    return summary


@release_on_error
def read_checked(summary: FileSummary, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a scanned file (`keys` of its summary, all by default) with their values checked."""
    keys = list(summary.shapes if keys is None else keys)
    raw = read_tensors(summary.path, [summary.prefix + k for k in keys])
    tensors = {k[len(summary.prefix):]: v for k, v in raw.items()}
    _check_values(tensors, summary.path)
    return tensors


def _check_values(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise CheckpointError(f"tensor {key!r} has dtype {value.dtype}; expected floating point", path)
        if not torch.isfinite(value).all():
            raise CheckpointError(f"tensor {key!r} contains NaN or infinite values (damaged training run?)", path)


@release_on_error
def load_base(path: str | os.PathLike, host_ops: Any = None, num_heads: int = SD15_NUM_HEADS,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> CtrLoRAControlNet:
    """Load a CtrLoRA Base ControlNet; leftover LoRA tensors in the file are ignored.

    The architecture is inferred from the shapes in the header, and the file is refused
    before its tensors are read when they do not fit it.
    """
    summary = require_kind(path, FileKind.CTRLORA_BASE)
    trunk_shapes = {k: s for k, s in summary.shapes.items() if "lora_layer" not in k}
    in_ch = trunk_shapes["input_blocks.0.0.weight"][1]
    if in_ch != 4:
        raise CheckpointError(f"first conv takes {in_ch} channels; a CtrLoRA base takes the 4-channel "
                              "VAE latent of the condition", summary.path)
    config = infer_config(trunk_shapes, num_heads=num_heads)
    with torch.device("meta"):
        # The key check uses plain torch layers: a host's layers may create their weights
        # only when they are loaded (ComfyUI's Linear under dynamic VRAM), so the model to
        # load can list fewer keys now than it will hold.
        reference = CtrLoRAControlNet(config)
        model = reference if host_ops is None else CtrLoRAControlNet(config, host_ops)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    missing = sorted(set(expected) - set(trunk_shapes))
    unexpected = sorted(set(trunk_shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"does not match the inferred architecture: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}", summary.path)
    for key, shape in trunk_shapes.items():
        if shape != expected[key]:
            raise CheckpointError(f"shape mismatch at {key!r}: file {list(shape)}, "
                                  f"architecture {list(expected[key])}", summary.path)
    raw = read_tensors(summary.path, [summary.prefix + k for k in trunk_shapes])
    trunk = {k[len(summary.prefix):]: v for k, v in raw.items()}
    _check_values(trunk, summary.path)
    # cast before loading and assign: every layer then holds exactly these tensors, whether
    # it copies into weights it made or takes the tensors it is given
    model.load_state_dict({k: v.to(device, dtype) for k, v in trunk.items()}, assign=True)
    model.eval().requires_grad_(False)
    model.source_path = summary.path
    return model


@release_on_error
def load_adapter(path: str | os.PathLike, model: CtrLoRAControlNet | None = None) -> CtrLoRAAdapter:
    """Load a CtrLoRA condition LoRA (official or ours); checked against `model` when given.

    Kind and fit to `model` are checked from the header, so a misfit is refused before it is read.
    """
    summary = require_kind(path, FileKind.CTRLORA_LORA)
    if model is not None:
        check_adapter_shapes(summary.shapes, model, summary.path)
    name = os.path.splitext(os.path.basename(summary.path))[0]
    adapter = CtrLoRAAdapter({k: v.float() for k, v in read_checked(summary).items()}, name=name,
                             metadata=summary.metadata)
    adapter.rank  # noqa: B018  (raises on mixed ranks)
    return adapter


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, Any] | None = None) -> None:
    """Write a .safetensors file atomically (CPU, contiguous copies; metadata values as strings)."""
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=meta))


def save_adapter(adapter: CtrLoRAAdapter, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
    """Save `adapter` as .safetensors in the official key layout (`control_model.` prefix) with metadata.

    Standard metadata keys: format, format_version, rank, condition, prompt_template,
    base_sha256, training_steps, resolution (missing ones are simply absent).
    """
    meta = dict(adapter.metadata)
    meta.update({k: str(v) for k, v in (metadata or {}).items() if v is not None})
    meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, rank=str(adapter.rank))
    save_safetensors({CONTROL_PREFIX + k: v.float() for k, v in adapter.tensors.items()}, path, meta)
