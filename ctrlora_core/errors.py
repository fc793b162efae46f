"""Exception types raised by ctrlora_core, and `release_on_error` for the functions that load files."""
from __future__ import annotations

import functools
import traceback
from typing import Callable, TypeVar

Function = TypeVar("Function", bound=Callable)


class CtrLoRAError(Exception):
    """Base class for every error ctrlora_core raises on bad input."""


class CheckpointError(CtrLoRAError, ValueError):
    """A model file is unreadable, of the wrong kind, or does not match the model.

    The message always names the file (when there is one) and says what was expected.
    """

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def release_on_error(function: Function) -> Function:
    """Make an exception leaving `function` hold its message and traceback text, not the values it met.

    A traceback keeps every frame it passed through alive, and with them their local
    variables: the tensors a failed load had read, a memory-mapped file. Whoever keeps the
    error (ComfyUI's executor holds it in a reference cycle until its next garbage
    collection, a notebook keeps `sys.last_exc`) would keep those too. So the frames below
    `function` (finished by now) are cleared, for the exception and every exception chained
    to it, and a context hidden by `raise ... from None` (set all the same) is dropped: a
    cleared frame still holds its function, whose closure may hold what the frame did
    (torch.load's nested loaders hold the file's memory map). The traceback still prints
    file, line and code.
    """
    @functools.wraps(function)
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as err:
            _clear_frames(err)
            raise
    return run  # type: ignore[return-value]


def _clear_frames(err: BaseException) -> None:
    """Clear the finished frames in the tracebacks of `err` and of every exception chained to it."""
    pending, seen = [err], set()
    while pending:
        chained = pending.pop()
        if chained is None or id(chained) in seen:
            continue
        seen.add(id(chained))
        traceback.clear_frames(chained.__traceback__)  # a frame still running (the caller's) is skipped
        if chained.__suppress_context__:
            chained.__context__ = None  # never printed, only kept alive
        pending += [chained.__cause__, chained.__context__]
