"""ComfyUI as a library in this process, and this pack imported the way ComfyUI imports it.

- `import_comfy(comfy_path, cpu=True)`: makes `comfy.*` importable from a ComfyUI checkout and
  sets ComfyUI's command-line defaults before any of its modules reads them. ComfyUI's own
  top-level modules (`nodes`, `folder_paths`, ...) come from that checkout.
- `load_pack()`: this repository as a custom node package, as ComfyUI loads a folder of
  custom_nodes/ (a package named after the folder, its `__init__.py` executed); the pack's
  modules are then `<PACK_NAME>.nodes.loaders`, `<PACK_NAME>.ctrlora_core.formats`, ...
  `pack_module("nodes.apply")` imports one of them.

The pack's `nodes` package therefore never shares the top-level name `nodes` with ComfyUI's.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "ComfyUI_CtrLoRA"  # a valid identifier, so tests can write `from ComfyUI_CtrLoRA.nodes import ...`


def import_comfy(comfy_path: str, cpu: bool = True) -> ModuleType:
    """Import `comfy` from the checkout at `comfy_path` (CPU only unless `cpu` is False)."""
    if not os.path.isfile(os.path.join(comfy_path, "comfy", "model_management.py")):
        raise FileNotFoundError(f"{comfy_path} is not a ComfyUI checkout (no comfy/model_management.py)")
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)  # ComfyUI's top-level modules resolve as ComfyUI's main.py sees them
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import comfy.model_management  # noqa: F401  (reads the args above once)

    return sys.modules["comfy"]


def load_pack() -> ModuleType:
    """This repository imported as ComfyUI imports a custom node folder (once per process)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, os.path.join(PACK_ROOT, "__init__.py"),
                                                  submodule_search_locations=[PACK_ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = pack
    try:
        spec.loader.exec_module(pack)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return pack


def pack_module(name: str) -> ModuleType:
    """A module of the pack by its path inside the pack, e.g. "nodes.apply" or "ctrlora_core.errors"."""
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")
