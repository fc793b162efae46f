"""A refused file costs nothing: kinds come from headers or key tables, and a refusal keeps no tensors.

Cost of reading a file is measured on this process (testbed/refusal.py): bytes read by
system calls and the peak resident memory during the call, which also counts
memory-mapped tensor data that is touched. Each file carries a 32 MB tensor, so reading
its data would cost at least that; a header or key table costs kilobytes.
"""
from __future__ import annotations

import os
import zipfile
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from ComfyUI_CtrLoRA.ctrlora_core.errors import CheckpointError as PackCheckpointError
from ComfyUI_CtrLoRA.nodes.handles import LoRAHandle
from ComfyUI_CtrLoRA.nodes.loaders import CtrLoRABlendLoRAs
from ctrlora_core import describe as describe_cli
from ctrlora_core import formats
from ctrlora_core.config import ControlNetConfig
from ctrlora_core.errors import CheckpointError, CtrLoRAError
from ctrlora_core.formats import FileKind, load_adapter, load_base, save_adapter, scan_file
from ctrlora_core.random_weights import random_adapter, random_base, write_random_files
from testbed.refusal import cost, refusal, tensors_kept_by_refusal
from train.backbones.comfy import ComfyBackbone

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")

BIG = (2048, 4096)  # float32: 32 MiB of tensor data in every file below
BIG_BYTES = 4 * BIG[0] * BIG[1]
OTHER_CONFIG = ControlNetConfig(model_channels=32, channel_mult=(1, 1, 1, 1), context_dim=32)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ctrlora_pwned",))


def kind_keys() -> dict[str, tuple[FileKind | None, dict]]:
    """name -> (kind, tensors): the big tensor under a key that makes the file that kind."""
    big = torch.zeros(BIG)

    def small():
        return torch.zeros(4, 4)

    return {
        "base": (FileKind.CTRLORA_BASE, {"control_model.input_blocks.0.0.weight": big,
                                         "control_model.zero_convs.0.0.weight": small()}),
        "lora": (FileKind.CTRLORA_LORA, {"control_model.input_blocks.1.1.proj_in.lora_layer.down.weight": big,
                                         "control_model.input_blocks.1.1.proj_in.lora_layer.up.weight": small(),
                                         "control_model.zero_convs.0.0.weight": small()}),
        "controlnet": (FileKind.CONTROLNET, {"input_hint_block.0.weight": small(), "input_blocks.0.0.weight": big}),
        "sd_checkpoint": (FileKind.SD_CHECKPOINT, {"model.diffusion_model.input_blocks.0.0.weight": big}),
        "sd_lora": (FileKind.SD_LORA, {"lora_unet_mid_block_attn.lora_down.weight": big}),
        "unknown": (FileKind.UNKNOWN, {"encoder.weight": big}),
    }


@pytest.fixture(scope="module")
def kind_files(tmp_path_factory) -> dict[str, tuple[FileKind | None, str]]:
    """Every kind as .safetensors and as a zip pickle, plus a zip pickle that needs code (kind None)."""
    folder = tmp_path_factory.mktemp("kinds")
    files = {}
    for name, (kind, tensors) in kind_keys().items():
        save_file(tensors, str(folder / f"{name}.safetensors"))
        torch.save(tensors, folder / f"{name}.ckpt")
        files[f"{name}.safetensors"] = (kind, str(folder / f"{name}.safetensors"))
        files[f"{name}.ckpt"] = (kind, str(folder / f"{name}.ckpt"))
    torch.save({"control_model.input_blocks.0.0.weight": torch.zeros(BIG), "x": Exploit()}, folder / "code.ckpt")
    files["code.ckpt"] = (None, str(folder / "code.ckpt"))
    return files


def _cheap(measured: SimpleNamespace) -> bool:
    return measured.read < BIG_BYTES / 8 and measured.peak < BIG_BYTES / 8


@pytest.fixture(scope="module", autouse=True)
def warm_up(kind_files):
    """First calls import and allocate lazily (unpickler tables, ...); not what a file costs."""
    for _, path in kind_files.values():
        try:
            scan_file(path)
        except CheckpointError:
            pass


def test_each_kind_is_classified_from_its_header_or_key_table(kind_files):
    for name, (kind, path) in kind_files.items():
        with cost() as scanned:
            if kind is None:
                with pytest.raises(CheckpointError, match="refusing to load: the pickle needs code"):
                    scan_file(path)
            else:
                assert scan_file(path).kind == kind, name
        assert _cheap(scanned), f"{name}: classifying read {scanned.read} bytes, peak +{scanned.peak} bytes"
        if kind is not None:
            with cost() as described:
                assert describe_cli.describe(path, read_pickles=True)["kind"] == kind.value
            assert _cheap(described), f"{name}: describe read {described.read}, peak +{described.peak}"
    assert not os.path.exists("/tmp/ctrlora_pwned")


def test_a_wrong_kind_is_refused_by_the_loaders_at_the_cost_of_its_header(kind_files):
    for name, (kind, path) in kind_files.items():
        loaders = [(load_base, FileKind.CTRLORA_BASE), (load_adapter, FileKind.CTRLORA_LORA),
                   (lambda p: LoRAHandle.from_file(p, 1.0), FileKind.CTRLORA_LORA)]
        for loader, wanted in loaders:
            if kind == wanted:
                continue
            with cost() as refused:
                err = refusal(loader, path)
            assert isinstance(err, (CheckpointError, PackCheckpointError)), f"{name}: {err!r}"
            assert os.path.basename(path) in str(err)
            if kind is not None:
                assert f"this is a {kind.value} file, but a {wanted.value} was expected" in str(err)
            assert _cheap(refused), f"{name} as {wanted.value}: read {refused.read}, peak +{refused.peak}"


def test_truncated_tensor_data_classifies_and_fails_only_when_loaded(tmp_path):
    files = write_random_files(tmp_path, rank=4, lora_names=("lora",))
    for name, kind, loader in (("base", FileKind.CTRLORA_BASE, load_base),
                               ("lora", FileKind.CTRLORA_LORA, load_adapter)):
        path = files[name]
        with open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
        with open(path, "r+b") as f:
            f.truncate(8 + header_length + 16)  # the header and 16 bytes of tensor data
        assert scan_file(path).kind == kind
        assert describe_cli.describe(path)["kind"] == kind.value
        with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
            loader(path)
        assert os.path.basename(path) in str(err.value)


def test_a_lora_that_does_not_fit_the_base_is_refused_before_it_is_read(tmp_path, monkeypatch):
    files = write_random_files(tmp_path / "mine", rank=4, lora_names=())
    base = load_base(files["base"])
    other = tmp_path / "other.safetensors"
    save_adapter(random_adapter(random_base(OTHER_CONFIG, 1), 4, 0), other)

    def no_reading(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(formats, "read_tensors", no_reading)
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        load_adapter(other, base)
    assert "other.safetensors" in str(err.value)


def test_a_legacy_pickle_is_read_whole_and_then_freed(tmp_path):
    """torch cannot map a pre-1.6 (non-zip) pickle: it is read whole once, and nothing of it stays."""
    tensors = kind_keys()["base"][1]
    path = tmp_path / "legacy.ckpt"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    del tensors
    assert not zipfile.is_zipfile(path)
    with cost() as scanned:
        assert scan_file(path).kind == FileKind.CTRLORA_BASE
    assert scanned.read >= BIG_BYTES  # the documented price of the legacy format
    err, kept = tensors_kept_by_refusal(load_adapter, path)
    assert "CtrLoRA base ControlNet file" in str(err) and kept == []


# ---- nothing stays referenced after a refusal, even while its exception is kept


def _with_nan(tensors: dict, key: str) -> dict:
    tensors = dict(tensors)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    return tensors


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("damaged")
    files = write_random_files(folder, rank=8, lora_names=("lora",))
    lora, base = load_file(files["lora"]), load_file(files["base"])
    down = next(k for k in lora if k.endswith("lora_layer.down.weight"))
    save_file(_with_nan(lora, down), str(folder / "nan_lora.safetensors"))
    save_file(_with_nan(base, "control_model.middle_block_out.0.weight"), str(folder / "nan_base.safetensors"))
    torch.save({"control_model." + k: v for k, v in random_base(OTHER_CONFIG).state_dict().items()},
               folder / "record_missing.ckpt")
    with zipfile.ZipFile(folder / "record_missing.ckpt") as source, \
            zipfile.ZipFile(folder / "record_missing_cut.ckpt", "w") as cut:
        for item in source.infolist():
            if not item.filename.endswith("/data/7"):  # torch reads data/0..6, then fails on a missing record
                cut.writestr(item, source.read(item.filename))
    other = folder / "other_base_lora.safetensors"
    save_adapter(random_adapter(random_base(OTHER_CONFIG, 1), 4, 0), other)
    return SimpleNamespace(model=load_base(files["base"]), lora=files["lora"], base=files["base"], other=str(other),
                           nan_lora=str(folder / "nan_lora.safetensors"),
                           nan_base=str(folder / "nan_base.safetensors"),
                           record_missing=str(folder / "record_missing_cut.ckpt"))


def test_a_load_refused_after_reading_keeps_no_tensors(damaged):
    cases = [("NaN in a LoRA", load_adapter, (damaged.nan_lora,), "NaN or infinite"),
             ("NaN in a base", load_base, (damaged.nan_base,), "NaN or infinite"),
             ("missing record", scan_file, (damaged.record_missing,), "not a readable torch checkpoint"),
             ("wrong kind", load_adapter, (damaged.base,), "but a CtrLoRA condition LoRA was expected"),
             ("other base", load_adapter, (damaged.other, damaged.model), "shape mismatch")]
    for name, call, args, message in cases:
        err, kept = tensors_kept_by_refusal(call, *args)
        assert isinstance(err, CtrLoRAError) and message in str(err), f"{name}: {err!r}"
        assert kept == [], f"{name}: the kept error holds {len(kept)} tensors or storages"


def test_a_node_refusal_keeps_none_of_the_tensors_it_read(damaged):
    mine = LoRAHandle.from_file(damaged.lora, 1.0)
    other = LoRAHandle.from_file(damaged.other, 1.0)
    err, kept = tensors_kept_by_refusal(CtrLoRABlendLoRAs().blend, mine, 0.5, other, 0.5)
    assert isinstance(err, PackCheckpointError) and "different base models" in str(err)
    assert kept == [], f"the kept error holds {len(kept)} tensors or storages"


def test_a_kept_error_still_prints_its_traceback(damaged):
    import traceback

    err = refusal(load_adapter, damaged.nan_lora)
    text = "".join(traceback.format_exception(err))
    assert "_check_values" in text and "nan_lora.safetensors" in text


# ---- the trainer refuses wrong --model / --base files from their headers, before ComfyUI is looked for


def test_trainer_refuses_wrong_model_and_base_before_comfyui(kind_files, tmp_path):
    no_comfyui = str(tmp_path / "no-comfyui")  # reaching ComfyUI would fail with another message
    sd, base = kind_files["sd_checkpoint.safetensors"][1], kind_files["base.safetensors"][1]
    for kind in ("base", "lora", "controlnet", "sd_lora"):
        with cost() as refused:
            with pytest.raises(CtrLoRAError, match="but --model expects an SD1.5-family checkpoint"):
                ComfyBackbone(kind_files[f"{kind}.ckpt"][1], base, comfyui=no_comfyui)
        assert _cheap(refused)
    for kind in ("lora", "controlnet", "sd_checkpoint"):
        with pytest.raises(CheckpointError, match="but a CtrLoRA base ControlNet was expected"):
            ComfyBackbone(sd, kind_files[f"{kind}.safetensors"][1], comfyui=no_comfyui)
    with pytest.raises(CtrLoRAError, match="is not a ComfyUI folder"):  # good files: on to ComfyUI
        ComfyBackbone(sd, base, comfyui=no_comfyui)
