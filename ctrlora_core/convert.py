"""Convert an official `.ckpt` (or any readable model file) to `.safetensors`.

    python -m ctrlora_core.convert IN.ckpt OUT.safetensors [--fp16] [--force]

Keys are kept as they are (official layout), so every CtrLoRA loader still reads the
result. The pickle is read with `torch.load(weights_only=True)`: files that need code
to load are refused. The output is written atomically.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import CheckpointError
from .formats import read_tensors, save_safetensors, scan_file


def convert(src: str, dst: str, fp16: bool = False, force: bool = False) -> str:
    """Convert `src` to the safetensors file `dst`; return the detected kind's description."""
    if not dst.lower().endswith(".safetensors"):
        raise CheckpointError("output must end in .safetensors", dst)
    if os.path.exists(dst) and not force:
        raise CheckpointError("output exists; pass --force to overwrite", dst)
    summary = scan_file(src)
    tensors = read_tensors(src)
    if fp16:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_safetensors(tensors, dst, dict(summary.metadata, converted_from=os.path.basename(src)))
    return summary.kind.value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctrlora_core.convert", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="input .ckpt/.pt/.pth/.safetensors")
    parser.add_argument("dst", help="output .safetensors")
    parser.add_argument("--fp16", action="store_true", help="store floating-point tensors as float16")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)
    try:
        kind = convert(args.src, args.dst, args.fp16, args.force)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} ({kind}, dtype {'float16' if args.fp16 else 'as stored'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
