"""Tests for nodes/info_route.py: the /ctrlora/info resolver refuses everything outside the
registered model folders, and describing a file never unpickles it.

The library is imported through the pack (`ComfyUI_CtrLoRA.ctrlora_core`), the copy the nodes use,
so the error classes the nodes raise are the ones these tests catch.
"""
from __future__ import annotations

import os
import pickle
import sys
from types import SimpleNamespace

import pytest

from ComfyUI_CtrLoRA.ctrlora_core.formats import save_adapter
from ComfyUI_CtrLoRA.ctrlora_core.random_weights import SMALL_CONFIG, random_adapter, random_base, save_random_base
from ComfyUI_CtrLoRA.nodes.info_route import RouteError, file_info, register_routes, resolve_model_file

LORA_METADATA = {"condition": "dental", "prompt_template": "a {jaw} {view}", "training_steps": 1200,
                 "resolution": 512}


class _MkdirOnUnpickle:
    """Unpickling this object creates a directory: a visible trace of code run by pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def models(tmp_path):
    """Two ctrlora roots, a controlnet root and a folder outside all of them."""
    roots = {name: tmp_path / "models" / name for name in ("ctrlora", "ctrlora_extra", "controlnet")}
    for root in roots.values():
        root.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    base = random_base(SMALL_CONFIG, seed=0)
    save_random_base(roots["ctrlora"] / "base.safetensors", base)
    save_adapter(random_adapter(base, 4, seed=1), roots["ctrlora"] / "lora.safetensors", LORA_METADATA)
    (roots["ctrlora"] / "sub").mkdir()
    save_adapter(random_adapter(base, 4, seed=2), roots["ctrlora"] / "sub" / "nested.safetensors")
    save_adapter(random_adapter(base, 4, seed=3), roots["ctrlora_extra"] / "extra.safetensors")
    save_adapter(random_adapter(base, 4, seed=4), roots["controlnet"] / "in_controlnet.safetensors")
    save_adapter(random_adapter(base, 4, seed=5), outside / "secret.safetensors")
    (roots["ctrlora"] / "notes.txt").write_text("not a model")
    folder_paths = SimpleNamespace(folder_names_and_paths={
        "ctrlora": ([str(roots["ctrlora"]), str(roots["ctrlora_extra"])], {".safetensors", ".ckpt"}),
        "controlnet": ([str(roots["controlnet"])], {".safetensors", ".ckpt"}),
        "checkpoints": ([str(tmp_path / "models" / "checkpoints")], {".safetensors"}),
    })
    return SimpleNamespace(roots=roots, outside=outside, folder_paths=folder_paths)


def _refusal(folder: str, name: str, models) -> RouteError:
    with pytest.raises(RouteError) as caught:
        resolve_model_file(folder, name, models.folder_paths)
    return caught.value


def test_resolves_files_in_every_root_and_subfolders(models):
    fp = models.folder_paths
    assert resolve_model_file("ctrlora", "lora.safetensors", fp) == str(models.roots["ctrlora"] / "lora.safetensors")
    nested = resolve_model_file("ctrlora", "sub/nested.safetensors", fp)
    assert nested == str(models.roots["ctrlora"] / "sub" / "nested.safetensors")
    extra = str(models.roots["ctrlora_extra"] / "extra.safetensors")
    assert resolve_model_file("ctrlora", "extra.safetensors", fp) == extra
    assert resolve_model_file("controlnet", "in_controlnet.safetensors", fp).startswith(str(models.roots["controlnet"]))


@pytest.mark.parametrize("folder", ["checkpoints", "loras", "", "../ctrlora"])
def test_unknown_folders_are_refused(models, folder):
    err = _refusal(folder, "lora.safetensors", models)
    assert err.status == 404
    assert "unknown folder" in err.message


def test_pack_folder_missing_from_comfyui_is_refused(models):
    del models.folder_paths.folder_names_and_paths["controlnet"]
    err = _refusal("controlnet", "in_controlnet.safetensors", models)
    assert err.status == 404
    assert "not registered" in err.message


@pytest.mark.parametrize("name", ["../outside/secret.safetensors", "sub/../../../outside/secret.safetensors",
                                  "..\\outside\\secret.safetensors", "sub/../lora.safetensors"])
def test_dot_dot_is_refused(models, name):
    err = _refusal("ctrlora", name, models)
    assert err.status == 400
    assert "'..'" in err.message


def test_absolute_paths_are_refused(models):
    for name in (str(models.outside / "secret.safetensors"), str(models.roots["ctrlora"] / "lora.safetensors"),
                 "/etc/passwd.safetensors", "\\\\server\\share\\x.safetensors"):
        err = _refusal("ctrlora", name, models)
        assert err.status == 400, name
        assert "absolute" in err.message


def test_symlinks_pointing_out_are_refused(models):
    root = models.roots["ctrlora"]
    os.symlink(models.outside / "secret.safetensors", root / "link_out.safetensors")
    os.symlink(models.outside, root / "dir_out")
    for name in ("link_out.safetensors", "dir_out/secret.safetensors"):
        err = _refusal("ctrlora", name, models)
        assert err.status == 403, name
        assert "outside" in err.message


def test_symlinks_inside_the_folder_roots_are_followed(models):
    root = models.roots["ctrlora"]
    os.symlink(root / "lora.safetensors", root / "alias.safetensors")
    os.symlink(models.roots["ctrlora_extra"] / "extra.safetensors", root / "to_extra.safetensors")
    fp = models.folder_paths
    assert resolve_model_file("ctrlora", "alias.safetensors", fp) == str(root / "lora.safetensors")
    extra = str(models.roots["ctrlora_extra"] / "extra.safetensors")
    assert resolve_model_file("ctrlora", "to_extra.safetensors", fp) == extra


@pytest.mark.parametrize("name", ["notes.txt", "lora", "lora.safetensors.txt", "x.py", "x.json"])
def test_non_model_extensions_are_refused(models, name):
    err = _refusal("ctrlora", name, models)
    assert err.status == 400
    assert "expected a model file" in err.message


@pytest.mark.parametrize("name, status", [("", 400), ("lo\x00ra.safetensors", 400), ("missing.safetensors", 404),
                                          ("sub", 400), ("secret.safetensors", 404)])
def test_empty_bad_and_missing_names(models, name, status):
    assert _refusal("ctrlora", name, models).status == status


def test_info_reports_kind_rank_and_metadata(models):
    info = file_info("ctrlora", "lora.safetensors", models.folder_paths)
    assert info["kind"] == "CtrLoRA condition LoRA"
    assert info["rank"] == 4
    assert info["folder"] == "ctrlora"
    assert {k: info["metadata"][k] for k in LORA_METADATA} == {k: str(v) for k, v in LORA_METADATA.items()}
    base = file_info("ctrlora", "base.safetensors", models.folder_paths)
    assert base["kind"] == "CtrLoRA base ControlNet"
    assert base["metadata"] == {}


def test_info_reads_only_the_safetensors_header(models):
    """Tensor data cut off: loading the tensors would fail, the header-only description works."""
    path = models.roots["ctrlora"] / "lora.safetensors"
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:
        f.truncate(8 + header_length + 16)
    info = file_info("ctrlora", "lora.safetensors", models.folder_paths)
    assert info["metadata"]["condition"] == "dental"


def test_ckpt_is_never_unpickled(models, tmp_path):
    marker = tmp_path / "pickle_ran"
    payload = pickle.dumps({"state_dict": _MkdirOnUnpickle(str(marker))})
    (models.roots["ctrlora"] / "official.ckpt").write_bytes(payload)

    info = file_info("ctrlora", "official.ckpt", models.folder_paths)
    assert "official checkpoint" in info["kind"]
    assert info["metadata"] == {}
    assert not marker.exists()

    pickle.loads(payload)  # the payload is live: unpickling it does leave the trace
    assert marker.is_dir()


def test_unreadable_file_is_a_422_naming_the_file(models):
    (models.roots["ctrlora"] / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(RouteError) as caught:
        file_info("ctrlora", "broken.safetensors", models.folder_paths)
    assert caught.value.status == 422
    assert "broken.safetensors" in caught.value.message


def test_register_routes_is_a_no_op_without_comfyui(monkeypatch):
    monkeypatch.setitem(sys.modules, "server", None)  # `from server import ...` raises ImportError
    assert register_routes() is False
