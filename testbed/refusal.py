"""Measuring what a refused load costs and what it leaves behind (Linux /proc), for tests and benches.

- `cost()`: bytes read by system calls (/proc/self/io rchar) and the peak resident growth
  (VmHWM reset through /proc/self/clear_refs) of this process inside a `with` block; the
  peak also counts memory-mapped file data that was touched.
- `refusal(call, *args)`: the exception of a call that must fail, kept by the caller as
  ComfyUI keeps its last error.
- `tensors_kept_by_refusal(call, *args)`: that exception and the tensors and storages that
  are alive only because of the refused call.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Callable, Iterator

import torch


def proc_value(file: str, field: str) -> int:
    """A field of a /proc file such as /proc/self/status (kB values in bytes)."""
    with open(file) as f:
        for line in f:
            if line.startswith(field + ":"):
                value = int(line.split()[1])
                return value * 1024 if line.rstrip().endswith("kB") else value
    raise KeyError(f"{field} not in {file}")


@contextmanager
def cost() -> Iterator[SimpleNamespace]:
    """`.read` (bytes read by system calls) and `.peak` (peak resident growth, bytes) of the block."""
    measured = SimpleNamespace(read=0, peak=0)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    rss, read = proc_value("/proc/self/status", "VmRSS"), proc_value("/proc/self/io", "rchar")
    yield measured
    measured.read = proc_value("/proc/self/io", "rchar") - read
    measured.peak = proc_value("/proc/self/status", "VmHWM") - rss


def refusal(call: Callable, *args) -> Exception:
    """Run a call that must fail and return its exception."""
    try:
        call(*args)
    except Exception as err:  # noqa: BLE001  (any refusal; callers check which)
        return err
    raise AssertionError(f"{getattr(call, '__name__', call)} accepted {args}")


def live_tensors() -> dict[int, object]:
    """id -> every tensor and storage alive in this process (after a garbage collection)."""
    gc.collect()
    kinds = (torch.Tensor, torch.UntypedStorage, torch.TypedStorage)
    return {id(o): o for o in gc.get_objects() if issubclass(type(o), kinds)}


def tensors_kept_by_refusal(call: Callable, *args) -> tuple[Exception, list]:
    """(the kept exception of a refused call, the tensors and storages alive only since that call)."""
    refusal(call, *args)  # once before: state torch creates on first use is not the refusal's
    before = live_tensors()  # held, so their ids stay unique
    err = refusal(call, *args)
    return err, [o for key, o in live_tensors().items() if key not in before]
