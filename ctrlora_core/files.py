"""File helpers every part of the project shares: atomic writes, file identity, safetensors headers.

- `atomic_write(path, write)`: `write(tmp_path)` fills a temporary file in the target's
  folder, which then replaces `path` in one rename, so readers (and a crash) only ever
  see the old file or the whole new one.
- `file_stamp(path)`: (real path, size, mtime in ns), a cheap identity that changes when
  the file is replaced or rewritten; `file_sha256(path)`: the content hash.
- `read_safetensors_header(path)`: key -> (dtype, shape) and the metadata of a
  .safetensors file, reading only its JSON header (no tensor data).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from typing import Callable

from .errors import CheckpointError

# A safetensors header is JSON describing the tensors; real ones are far below this.
MAX_HEADER_BYTES = 100_000_000


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Create `path` through `write(tmp)` + rename; the temporary file is removed on any failure."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, data: object) -> None:
    """Write `data` as indented JSON through `atomic_write` (an interrupted run leaves the last good file)."""
    text = json.dumps(data, indent=2) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def file_stamp(path: str | os.PathLike) -> tuple[str, int, int]:
    """(real path, size in bytes, modification time in ns) of `path`."""
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Tensor entries (key -> {"dtype", "shape", "data_offsets"}) and metadata, from the header only.

    Raises CheckpointError naming the file when the header is missing, implausible or not JSON.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError("too short to be a safetensors file", path)
        (length,) = struct.unpack("<Q", raw)
        if not 0 < length <= MAX_HEADER_BYTES:
            raise CheckpointError(f"safetensors header length {length} is implausible (corrupt file?)", path)
        text = f.read(length)
    if len(text) != length:
        raise CheckpointError("safetensors header is cut short (truncated file?)", path)
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"safetensors header is not valid JSON (truncated?): {e}", path) from None
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", path)
    metadata = header.pop("__metadata__", None) or {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            raise CheckpointError(f"safetensors header entry {key!r} has no shape", path)
    return header, {str(k): str(v) for k, v in metadata.items()}
