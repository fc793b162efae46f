"""HTTP route for the front end: describe a model file picked in a CtrLoRA loader.

    GET /ctrlora/info?folder=ctrlora&file=NAME   (also under /api/...)

answers the JSON of `ctrlora_core.describe.describe(path, read_pickles=False)`: kind,
rank, parameter count and the file's metadata (condition, prompt template, training
steps, resolution). Only the safetensors header is read; a pickle (.ckpt) is never
opened, it is reported as an official checkpoint.

`resolve_model_file` is the security boundary and is pure (it takes a
`folder_paths`-like object), so it is tested without ComfyUI. A request is refused
(HTTP 4xx with a message) when the folder is not one the pack lists, the name is
absolute, contains '..', has an extension that is not a model file, or resolves
(through a symlink) to a place outside the folder's registered roots.
"""
from __future__ import annotations

import os
from typing import Any, Protocol

from ..ctrlora_core.describe import describe
from ..ctrlora_core.errors import CheckpointError

from .model_files import CONTROLNET_FOLDER, FOLDER, MODEL_EXTENSIONS

# Folders the CtrLoRA loaders list files from; nothing else can be inspected.
INFO_FOLDERS: tuple[str, ...] = (FOLDER, CONTROLNET_FOLDER)


class FolderPathsLike(Protocol):
    """The part of ComfyUI's `folder_paths` module the resolver uses."""

    folder_names_and_paths: dict[str, tuple[list[str], Any]]


class RouteError(Exception):
    """A refused request: `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def resolve_model_file(folder: str, name: str, folder_paths_like: FolderPathsLike) -> str:
    """Real path of model file `name` in registered folder `folder`, or raise RouteError.

    `name` is relative to one of the folder's roots, with '/' (or '\\') between
    subfolders, as ComfyUI lists it in a loader's combo.
    """
    if folder not in INFO_FOLDERS:
        raise RouteError(404, f"unknown folder {folder!r}: expected one of {', '.join(INFO_FOLDERS)}")
    registered = folder_paths_like.folder_names_and_paths.get(folder)
    if not registered or not registered[0]:
        raise RouteError(404, f"folder {folder!r} is not registered with ComfyUI")
    if not name:
        raise RouteError(400, "missing file name")
    if "\x00" in name:
        raise RouteError(400, "file name contains a NUL byte")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or os.path.splitdrive(name)[0]:
        raise RouteError(400, f"file name {name!r} must be relative to the {folder!r} folder, not absolute")
    if ".." in parts:
        raise RouteError(400, f"file name {name!r} must not contain '..'")
    if os.path.splitext(name)[1].lower() not in MODEL_EXTENSIONS:
        raise RouteError(400, f"file name {name!r}: expected a model file ({', '.join(sorted(MODEL_EXTENSIONS))})")

    roots = [os.path.realpath(root) for root in registered[0]]
    for root in roots:
        candidate = os.path.join(root, *parts)
        if not os.path.isfile(candidate):
            continue
        real = os.path.realpath(candidate)
        if not any(_is_inside(real, r) for r in roots):
            raise RouteError(403, f"file {name!r} links outside the {folder!r} model folders; refused")
        return real
    raise RouteError(404, f"file {name!r} not found in the {folder!r} model folders")


def _is_inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives (Windows)
        return False


def file_info(folder: str, name: str, folder_paths_like: FolderPathsLike) -> dict[str, Any]:
    """describe() of the resolved file; RouteError 404/400/403 when refused, 422 when unreadable."""
    path = resolve_model_file(folder, name, folder_paths_like)
    try:
        info = describe(path, read_pickles=False)
    except (CheckpointError, OSError) as err:
        raise RouteError(422, f"cannot read {name!r}: {err}") from None
    info["folder"] = folder
    return info


_registered = False


def register_routes() -> bool:
    """Add GET /ctrlora/info to ComfyUI's server; False (doing nothing) outside ComfyUI."""
    global _registered
    if _registered:
        return True
    try:
        import folder_paths
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False

    @server.routes.get("/ctrlora/info")
    async def ctrlora_info(request: web.Request) -> web.Response:
        folder = request.query.get("folder", "ctrlora")
        name = request.query.get("file", "")
        try:
            return web.json_response(file_info(folder, name, folder_paths))
        except RouteError as err:
            return web.json_response({"error": err.message}, status=err.status)

    _registered = True
    return True
