"""Fixtures for the tests that need a ComfyUI checkout ($COMFYUI_PATH); without it they are skipped.

Run them in an environment with ComfyUI's packages and this checkout installed (see the Makefile):

    make comfy-test COMFYUI_PATH=/path/to/ComfyUI COMFY_VENV=/path/to/comfy-venv

- `comfy_lib`: ComfyUI importable in this process, forced to the CPU (library tests).
- `model_cache`: random-weight full-size model files (testbed/fake_models.py), built once and cached.
- `comfy_server`: one headless ComfyUI (CPU, loopback, free port) for the session, with a
  temporary --base-directory made by testbed/comfy_base_dir.py (the pack, the cached models,
  generated condition images).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from testbed import fake_models
from testbed.comfy_base_dir import PACK_FOLDER as PACK_NAME  # noqa: F401  (test_server uses it)
from testbed.comfy_base_dir import make_base_directory
from testbed.comfy_host import import_comfy
from testbed.comfy_server import ComfyServer

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
SKIP_REASON = "COMFYUI_PATH is not set: ComfyUI integration tests skipped (see tests/integration/conftest.py)"


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_lib():
    """Import ComfyUI as a library on the CPU."""
    try:
        comfy = import_comfy(COMFYUI_PATH)
        import comfy.controlnet  # noqa: F401  (pulls in sd, ...)
        import comfy.sd  # noqa: F401
    except FileNotFoundError as err:
        pytest.fail(f"COMFYUI_PATH: {err}")
    except ImportError as err:
        pytest.skip(f"comfy does not import with this Python ({err}); run `make comfy-test`")
    return comfy


@pytest.fixture(scope="session")
def model_cache() -> str:
    folder = fake_models.cache_dir()
    if fake_models.missing_files(folder):
        # in a process of its own: building the checkpoint peaks at ~10 GiB, given back when it exits
        subprocess.run([sys.executable, "-m", "testbed.fake_models"], check=True,
                       env=dict(os.environ, COMFYUI_PATH=COMFYUI_PATH), timeout=1800)
    assert not fake_models.missing_files(folder)
    return folder


@pytest.fixture(scope="session")
def comfy_server(model_cache, tmp_path_factory):
    base_dir = str(tmp_path_factory.mktemp("comfyui_base"))
    make_base_directory(base_dir, model_cache)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    server = ComfyServer(COMFYUI_PATH, base_dir, python).start()
    try:
        yield server
    finally:
        server.stop()
