"""pytest plugin (pyproject.toml: `-p testbed.pytest_plugin`): collect the pack folder as a plain folder.

The pack's root holds ComfyUI's entry point `__init__.py`, so pytest would collect the folder as a
Python package and import that file under the folder's name: an error when the name is not a Python
identifier (a clone named ComfyUI-CtrLoRA), and otherwise a second copy of the whole pack. Tests
import the pack the way ComfyUI does instead (tests/conftest.py: `testbed.comfy_host.load_pack`).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from testbed.comfy_host import PACK_ROOT


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if path == Path(PACK_ROOT):
        return pytest.Dir.from_parent(parent, path=path)
    return None
