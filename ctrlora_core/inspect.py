"""Describe a model file: kind, rank, parameter count, metadata.

    python -m ctrlora_core.inspect FILE [FILE ...] [--json]

`describe(path, read_pickles=False)` reads only the header of a .safetensors file (no
tensor data) and, unless `read_pickles` is set, does not open pickles at all (a .ckpt is
reported as an official checkpoint). The ComfyUI info route uses it that way.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from typing import Any

from .errors import CheckpointError
from .formats import PICKLE_EXTENSIONS, SAFETENSORS_EXTENSIONS, classify, read_tensors


class _ShapeOnly:
    """Stands in for a tensor when only the header was read."""

    def __init__(self, shape: list[int]):
        self.shape = tuple(shape)


def read_safetensors_header(path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Key -> shape and the metadata of a .safetensors file, reading only its JSON header."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError("too short to be a safetensors file", path)
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise CheckpointError("safetensors header length is implausible (corrupt file?)", path)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"safetensors header is not valid JSON (truncated?): {e}", path) from None
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", path)
    metadata = header.pop("__metadata__", None) or {}
    return {k: tuple(v["shape"]) for k, v in header.items()}, dict(metadata)


def _rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    ranks = {s[0] for k, s in shapes.items() if k.endswith("lora_layer.down.weight")}
    return ranks.pop() if len(ranks) == 1 else None


def describe(path: str | os.PathLike, read_pickles: bool = False) -> dict[str, Any]:
    """Return a JSON-able description of the file at `path` (raises CheckpointError)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    info: dict[str, Any] = {"file": os.path.basename(path), "size_bytes": os.path.getsize(path)}
    if ext in SAFETENSORS_EXTENSIONS:
        shapes, metadata = read_safetensors_header(path)
    elif ext in PICKLE_EXTENSIONS and read_pickles:
        tensors, metadata = read_tensors(path)
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    elif ext in PICKLE_EXTENSIONS:
        info.update(kind="official checkpoint (.ckpt: contents not read)", metadata={})
        return info
    else:
        raise CheckpointError(f"unsupported extension {ext!r}", path)
    kind, control, notes = classify({k: _ShapeOnly(list(s)) for k, s in shapes.items()})
    control_shapes = {k: v.shape for k, v in control.items()}
    params = sum(_numel(s) for s in control_shapes.values())
    info.update(kind=kind.value, tensors=len(shapes), params=params, rank=_rank(control_shapes),
                metadata=metadata or {}, notes=notes)
    return info


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctrlora_core.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help=".safetensors or .ckpt files")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            info = describe(path, read_pickles=True)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        if args.json:
            print(json.dumps(info))
            continue
        print(f"{path}")
        for key in ("kind", "tensors", "params", "rank", "size_bytes"):
            if info.get(key) is not None:
                value = f"{info[key]:,}" if isinstance(info[key], int) else info[key]
                print(f"  {key:<10} {value}")
        for note in info.get("notes", []):
            print(f"  note       {note}")
        for key, value in sorted(info.get("metadata", {}).items()):
            print(f"  meta.{key} = {value}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
