"""File formats: kinds, official layouts, our LoRA files with metadata, CLIs, and malformed input."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctrlora_core import convert as convert_cli
from ctrlora_core import describe as describe_cli
from ctrlora_core.adapters import CtrLoRAAdapter
from ctrlora_core.errors import CheckpointError
from ctrlora_core.formats import (
    FileKind, classify, load_adapter, load_base, save_adapter, scan_file)
from ctrlora_core.random_weights import write_random_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_random_files(tmp_path_factory.mktemp("random"), rank=8)


@pytest.fixture(scope="module")
def base(files):
    return load_base(files["base"])


@pytest.fixture
def lora_tensors(files):
    return load_file(files["lora_a"])


def write(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(tensors, str(path), metadata=metadata)
    else:
        torch.save(tensors, str(path))
    return str(path)


def test_official_layouts_are_classified(files):
    for name, kind in (("base", FileKind.CTRLORA_BASE), ("lora_a", FileKind.CTRLORA_LORA)):
        assert scan_file(files[name]).kind == kind
    assert classify(["model.diffusion_model.input_blocks.0.0.weight"])[0] == FileKind.SD_CHECKPOINT
    assert classify(["input_hint_block.0.weight", "input_blocks.0.0.weight"])[0] == FileKind.CONTROLNET
    assert classify(["lora_unet_down_blocks_0.lora_down.weight"])[0] == FileKind.SD_LORA


def test_saved_lora_has_official_layout_and_metadata(tmp_path, base, files):
    adapter = load_adapter(files["lora_a"], base)
    out = tmp_path / "ours.safetensors"
    save_adapter(adapter, out, {"condition": "lighting_seg", "prompt_template": "a {jaw} model",
                                "training_steps": 1000, "resolution": 512, "base_sha256": "ab" * 32})
    tensors = load_file(str(out))
    assert len(tensors) == 246 and all(k.startswith("control_model.") for k in tensors)
    info = describe_cli.describe(out)
    assert info["kind"] == FileKind.CTRLORA_LORA.value and info["rank"] == 8
    meta = info["metadata"]
    assert meta["format"] == "ctrlora-lora" and meta["training_steps"] == "1000" and meta["resolution"] == "512"
    reloaded = load_adapter(out, base)
    assert all(torch.equal(reloaded.tensors[k], adapter.tensors[k]) for k in adapter.tensors)


def test_training_checkpoint_wrapper_uses_control_part(tmp_path, files, base):
    sd = {k: v for k, v in load_file(files["lora_a"]).items()}
    sd["model.diffusion_model.out.0.weight"] = torch.ones(4)
    path = write(tmp_path, "train.ckpt", {"state_dict": sd})
    adapter = load_adapter(path, base)
    assert len(adapter.tensors) == 246


def test_convert_ckpt_to_safetensors_keeps_keys(tmp_path, files):
    src = write(tmp_path, "lora.ckpt", load_file(files["lora_a"]))
    dst = str(tmp_path / "lora.safetensors")
    assert convert_cli.main([src, dst]) == 0
    assert load_file(dst).keys() == load_file(files["lora_a"]).keys()
    assert convert_cli.main([src, dst]) == 1  # refuses to overwrite without --force


def test_inspect_does_not_open_pickles_unless_asked(tmp_path, files):
    path = write(tmp_path, "lora.ckpt", load_file(files["lora_a"]))
    assert describe_kind(path, False).startswith("official checkpoint")
    assert describe_kind(path, True) == FileKind.CTRLORA_LORA.value


def describe_kind(path, read_pickles):
    return describe_cli.describe(path, read_pickles=read_pickles)["kind"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ctrlora_pwned",))


def bad_files(tmp_path, files):
    """(name, path, expected message fragment, loader) for every malformed-input case."""
    lora = load_file(files["lora_a"])
    key = "control_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_layer.up.weight"
    down = key.replace(".up.", ".down.")
    cases = []

    raw = open(files["lora_a"], "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    cases.append(("truncated", str(truncated), "truncated or corrupt", "lora"))

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    cases.append(("empty file", str(empty), "empty (0 bytes)", "lora"))

    cases.append(("no tensors", write(tmp_path, "none.ckpt", {}), "contains no tensors", "lora"))
    cases.append(("base given as LoRA", files["base"], "CtrLoRA base ControlNet file, but a CtrLoRA condition LoRA",
                  "lora"))
    cases.append(("LoRA given as base", files["lora_a"], "CtrLoRA condition LoRA file, but a CtrLoRA base", "base"))
    sd_ckpt = write(tmp_path, "sd.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)})
    cases.append(("SD checkpoint", sd_ckpt, "Stable Diffusion checkpoint", "lora"))
    cn = write(tmp_path, "cn.safetensors", {"input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
                                             "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)})
    cases.append(("plain ControlNet", cn, "plain ControlNet", "base"))

    rank_mix = dict(lora)
    rank_mix[key] = torch.zeros(rank_mix[key].shape[0], 4)
    cases.append(("rank mismatch", write(tmp_path, "rank.safetensors", rank_mix), "rank mismatch", "lora"))

    shape = dict(lora)
    shape[down] = torch.zeros(8, 7)
    cases.append(("shape mismatch", write(tmp_path, "shape.safetensors", shape), "shape mismatch", "lora"))

    nan = dict(lora)
    nan[key] = torch.full_like(nan[key], float("nan"))
    cases.append(("NaN values", write(tmp_path, "nan.safetensors", nan), "NaN or infinite", "lora"))

    exploit = tmp_path / "exploit.ckpt"
    with open(exploit, "wb") as f:
        pickle.dump({"control_model.x": Exploit()}, f)
    cases.append(("code pickle", str(exploit), "refusing to load", "lora"))

    kohya = write(tmp_path, "kohya.safetensors", {"lora_unet_mid_block_attn.lora_down.weight": torch.zeros(4, 8)})
    cases.append(("ordinary SD LoRA (wrong prefix)", kohya, "ordinary SD LoRA", "lora"))

    missing = {k: v for k, v in lora.items() if "middle_block" not in k}
    cases.append(("missing keys", write(tmp_path, "missing.safetensors", missing), "incomplete", "lora"))

    ints = dict(lora)
    ints[key] = ints[key].to(torch.int32)
    cases.append(("integer tensor", write(tmp_path, "int.safetensors", ints), "expected floating point", "lora"))

    cases.append(("wrong extension", write(tmp_path, "lora.txt.safetensors", lora).replace(".safetensors", ""),
                  "does not exist", "lora"))
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    cases.append(("unsupported extension", str(txt), "unsupported extension", "lora"))
    cases.append(("directory", str(tmp_path), "not a regular file", "lora"))
    return cases


def test_every_malformed_file_gets_a_specific_error(tmp_path, files, base):
    cases = bad_files(tmp_path, files)
    assert len(cases) >= 10
    for name, path, fragment, loader in cases:
        with pytest.raises(CheckpointError) as err:
            load_adapter(path, base) if loader == "lora" else load_base(path)
        message = str(err.value)
        assert fragment in message, f"{name}: {message}"
        assert os.path.basename(path) in message, f"{name}: error does not name the file: {message}"
    assert not os.path.exists("/tmp/ctrlora_pwned")


def test_describe_cli_prints_json(files, capsys):
    assert describe_cli.main(["--json", files["lora_a"]]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensors"] == 246 and info["metadata"]["condition"] == "lora_a"


def test_lora_from_a_different_base_is_refused(tmp_path, base):
    from ctrlora_core.config import ControlNetConfig
    from ctrlora_core.random_weights import random_adapter, random_base
    other = random_base(ControlNetConfig(model_channels=32, channel_mult=(1, 1, 1, 1), context_dim=32))
    path = tmp_path / "other.safetensors"
    save_adapter(random_adapter(other, 4, 0), path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_adapter(path, base)
    assert isinstance(load_adapter(path), CtrLoRAAdapter)  # fine on its own
