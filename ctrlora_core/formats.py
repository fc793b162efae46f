"""Reading and writing CtrLoRA files: official `.ckpt`/`.safetensors` and our own LoRA files.

Reading never executes pickled code: `.safetensors` through safetensors, pickles only
through `torch.load(..., weights_only=True)`. Every problem raises `CheckpointError`
naming the file and what was expected.

File kinds are recognised from the keys (after unwrapping a `state_dict` wrapper):

- CtrLoRA base: a ControlNet trunk whose first conv takes the 4-channel latent, no hint
  block (official files also carry leftover `lora_layer` tensors, ignored for the base);
- CtrLoRA LoRA: only `lora_layer`, zero-conv and attention-norm tensors (246 for SD1.5);
- plain ControlNet (has `input_hint_block`), SD checkpoint (`model.diffusion_model.`),
  ordinary SD LoRA (kohya/diffusers), or unknown.

A full training checkpoint (SD + `control_model.` keys) is accepted: its control part is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapters import LORA_DOWN, CtrLoRAAdapter, is_adapter_key
from .config import SD15_NUM_HEADS, infer_config
from .controlnet import CtrLoRAControlNet
from .errors import CheckpointError

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
class LoadedFile:
    """The tensors of a model file, its kind and what was noticed while reading it."""

    path: str
    kind: FileKind
    tensors: dict[str, torch.Tensor]  # un-prefixed control keys for CtrLoRA kinds, raw keys otherwise
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a flat name->tensor dict and the safetensors metadata (empty for pickles).

    Unwraps a `state_dict` wrapper. Refuses pickles that need code to load.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError("file does not exist", path)
    if not os.path.isfile(path):
        raise CheckpointError("is not a regular file", path)
    if os.path.getsize(path) == 0:
        raise CheckpointError("file is empty (0 bytes)", path)
    ext = os.path.splitext(path)[1].lower()
    if ext in SAFETENSORS_EXTENSIONS:
        tensors, metadata = _read_safetensors(path)
    elif ext in PICKLE_EXTENSIONS:
        tensors, metadata = _read_pickle(path), {}
    else:
        raise CheckpointError(
            f"unsupported extension {ext!r}; expected one of {SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS}", path)
    if not tensors:
        raise CheckpointError("contains no tensors", path)
    return tensors, metadata


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len)) if 0 < header_len < 100_000_000 else None
        if not isinstance(header, dict):
            raise ValueError("bad header")
        tensors = load_file(path)
    except (SafetensorError, ValueError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"not a readable safetensors file (truncated or corrupt?): {e}", path) from None
    return tensors, dict(header.get("__metadata__") or {})


def _read_pickle(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
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
    return dict(obj)


def classify(tensors: Mapping[str, torch.Tensor]) -> tuple[FileKind, dict[str, torch.Tensor], list[str]]:
    """Return (kind, control tensors without prefix, notes) for a raw key->tensor dict."""
    notes: list[str] = []
    control = {k[len(CONTROL_PREFIX):]: v for k, v in tensors.items() if k.startswith(CONTROL_PREFIX)}
    if control:
        if len(control) < len(tensors):
            notes.append(f"full checkpoint: using its {len(control)} control_model tensors, "
                         f"ignoring {len(tensors) - len(control)} others")
    elif any(k.startswith(SD_UNET_PREFIX) for k in tensors):
        return FileKind.SD_CHECKPOINT, {}, notes
    else:
        control = dict(tensors)
    keys = control.keys()
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora.down." in k for k in keys):
        return FileKind.SD_LORA, control, notes
    if any(k.startswith("input_hint_block.") for k in keys):
        return FileKind.CONTROLNET, control, notes
    if any(k.startswith("output_blocks.") for k in keys):
        return FileKind.SD_CHECKPOINT, control, notes
    if "input_blocks.0.0.weight" in control:
        return FileKind.CTRLORA_BASE, control, notes
    if any(k.endswith(LORA_DOWN) for k in keys) and all(is_adapter_key(k) for k in keys):
        return FileKind.CTRLORA_LORA, control, notes
    return FileKind.UNKNOWN, control, notes


def load_file_of_kind(path: str | os.PathLike, expected: FileKind) -> LoadedFile:
    """Read `path` and refuse it unless it is of the `expected` kind."""
    tensors, metadata = read_tensors(path)
    kind, control, notes = classify(tensors)
    if kind != expected:
        sample = ", ".join(list(tensors)[:3])
        raise CheckpointError(f"this is a {kind.value} file, but a {expected.value} was expected "
                              f"(first keys: {sample})", os.fspath(path))
    _check_values(control, os.fspath(path))
    return LoadedFile(os.fspath(path), kind, control, metadata, notes)


def _check_values(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise CheckpointError(f"tensor {key!r} has dtype {value.dtype}; expected floating point", path)
        if not torch.isfinite(value).all():
            raise CheckpointError(f"tensor {key!r} contains NaN or infinite values (damaged training run?)", path)


def load_base(path: str | os.PathLike, host_ops: Any = None, num_heads: int = SD15_NUM_HEADS,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> CtrLoRAControlNet:
    """Load a CtrLoRA Base ControlNet; leftover LoRA tensors in the file are ignored.

    The architecture is inferred from the weights. If the file has no zero convs or norms
    (they normally ship with it), the missing ones are reported as an error.
    """
    loaded = load_file_of_kind(path, FileKind.CTRLORA_BASE)
    trunk = {k: v for k, v in loaded.tensors.items() if "lora_layer" not in k}
    in_ch = trunk["input_blocks.0.0.weight"].shape[1]
    if in_ch != 4:
        raise CheckpointError(f"first conv takes {in_ch} channels; a CtrLoRA base takes the 4-channel "
                              "VAE latent of the condition", loaded.path)
    config = infer_config(trunk, num_heads=num_heads)
    with torch.device("meta"):
        model = CtrLoRAControlNet(config, host_ops)
    expected = model.state_dict().keys()
    missing = sorted(set(expected) - set(trunk))
    unexpected = sorted(set(trunk) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"does not match the inferred architecture: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}", loaded.path)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for key, value in trunk.items():
        if value.shape != shapes[key]:
            raise CheckpointError(f"shape mismatch at {key!r}: file {list(value.shape)}, "
                                  f"architecture {list(shapes[key])}", loaded.path)
    model.load_state_dict({k: v.to(device, dtype) for k, v in trunk.items()}, assign=True)
    model.eval().requires_grad_(False)
    model.source_path = loaded.path
    return model


def load_adapter(path: str | os.PathLike, model: CtrLoRAControlNet | None = None) -> CtrLoRAAdapter:
    """Load a CtrLoRA condition LoRA (official or ours); checked against `model` when given."""
    loaded = load_file_of_kind(path, FileKind.CTRLORA_LORA)
    name = os.path.splitext(os.path.basename(loaded.path))[0]
    adapter = CtrLoRAAdapter({k: v.float() for k, v in loaded.tensors.items()}, name=name,
                             metadata=loaded.metadata)
    if model is not None:
        adapter.check_against(model, loaded.path)
    else:
        adapter.rank  # noqa: B018  (raises on mixed ranks)
    return adapter


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file via a temp file in the same folder + rename (never half-written)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapter(adapter: CtrLoRAAdapter, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
    """Save `adapter` as .safetensors in the official key layout (`control_model.` prefix) with metadata.

    Standard metadata keys: format, format_version, rank, condition, prompt_template,
    base_sha256, training_steps, resolution (missing ones are simply absent).
    """
    meta = dict(adapter.metadata)
    meta.update({k: str(v) for k, v in (metadata or {}).items() if v is not None})
    meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, rank=str(adapter.rank))
    atomic_save_safetensors({CONTROL_PREFIX + k: v.float() for k, v in adapter.tensors.items()}, path, meta)
