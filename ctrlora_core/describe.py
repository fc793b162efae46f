"""Describe a model file: kind, rank, parameter count, metadata.

    python -m ctrlora_core.describe FILE [FILE ...] [--json]

(This command was `python -m ctrlora_core.inspect` before 0.2; the module was renamed so it
no longer shares its name with the standard library's `inspect`.)

`describe(path, read_pickles=False)` reads only the header of a .safetensors file, or with
`read_pickles` the key table of a pickle (tensor data is never read; a legacy pre-zip
pickle is the exception, torch reads it whole). Without `read_pickles` a pickle is not
opened at all and is reported as an official checkpoint; the ComfyUI info route uses it
that way.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from .errors import CheckpointError
from .formats import PICKLE_EXTENSIONS, SAFETENSORS_EXTENSIONS, scan_file


def _rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    ranks = {s[0] for k, s in shapes.items() if k.endswith("lora_layer.down.weight")}
    return ranks.pop() if len(ranks) == 1 else None


def describe(path: str | os.PathLike, read_pickles: bool = False) -> dict[str, Any]:
    """Return a JSON-able description of the file at `path` (raises CheckpointError)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS:
        raise CheckpointError(f"unsupported extension {ext!r}", path)
    info: dict[str, Any] = {"file": os.path.basename(path), "size_bytes": os.path.getsize(path)}
    if ext in PICKLE_EXTENSIONS and not read_pickles:
        info.update(kind="official checkpoint (.ckpt: contents not read)", metadata={})
        return info
    summary = scan_file(path)
    info.update(kind=summary.kind.value, tensors=len(summary.shapes), rank=_rank(summary.shapes),
                params=sum(math.prod(s) for s in summary.shapes.values()), metadata=summary.metadata,
                notes=summary.notes)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctrlora_core.describe", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help=".safetensors or .ckpt files")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            info = describe(path, read_pickles=True)
        except (CheckpointError, OSError) as e:
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
