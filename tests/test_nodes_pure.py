"""Node logic that needs no ComfyUI: model file listing, LoRA handles, conditions, blends, dental helpers.

The library is imported through the pack (`ComfyUI_CtrLoRA.ctrlora_core`), the copy the nodes use,
so the error classes the nodes raise are the ones these tests catch.
"""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ComfyUI_CtrLoRA.ctrlora_core.adapters import blend_adapters
from ComfyUI_CtrLoRA.ctrlora_core.conditions import DENTAL_PALETTE, ConditionError, blend_lighting_seg
from ComfyUI_CtrLoRA.ctrlora_core.config import ControlNetConfig
from ComfyUI_CtrLoRA.ctrlora_core.errors import CheckpointError
from ComfyUI_CtrLoRA.ctrlora_core.formats import FileKind, load_adapter, save_adapter
from ComfyUI_CtrLoRA.ctrlora_core.prompts import DEFAULT_TEMPLATE, PromptError
from ComfyUI_CtrLoRA.ctrlora_core.random_weights import SMALL_CONFIG, random_adapter, random_base, save_random_base
from ComfyUI_CtrLoRA.nodes import model_files
from ComfyUI_CtrLoRA.nodes.apply import CtrLoRACondition
from ComfyUI_CtrLoRA.nodes.block_weights import block_multipliers
from ComfyUI_CtrLoRA.nodes.dental import CtrLoRABlendLightingSeg, CtrLoRADentalPrompt
from ComfyUI_CtrLoRA.nodes.handles import LoRAHandle
from ComfyUI_CtrLoRA.nodes.loaders import CtrLoRABlendLoRAs

EXTENSIONS = {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft"}


class FakeFolderPaths:
    """The part of ComfyUI's folder_paths the pack uses, over real folders."""

    def __init__(self, models_dir: str, controlnet_dir: str):
        self.models_dir = models_dir
        self.folder_names_and_paths = {"controlnet": ([controlnet_dir], set(EXTENSIONS))}

    def get_filename_list(self, folder: str) -> list[str]:
        names = []
        for root in self.folder_names_and_paths[folder][0]:
            if os.path.isdir(root):
                for dirpath, _, files in os.walk(root):
                    names += [os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/") for f in files]
        return sorted(names)

    def get_full_path(self, folder: str, name: str) -> str | None:
        for root in self.folder_names_and_paths[folder][0]:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                return path
        return None


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small base, three LoRAs for it (one with metadata), a plain-ControlNet-looking file."""
    folder = tmp_path_factory.mktemp("files")
    base = random_base(SMALL_CONFIG, seed=0)
    paths = {"base": str(folder / "base.safetensors")}
    save_random_base(paths["base"], base)
    for i, name in enumerate(("a", "b", "c")):
        paths[name] = str(folder / f"{name}.safetensors")
        save_adapter(random_adapter(base, 4, seed=10 + i, name=name), paths[name],
                     {"condition": f"cond_{name}"} if name == "a" else None)
    return SimpleNamespace(model=base, paths=paths, folder=folder)


@pytest.fixture
def folders(tmp_path, small, monkeypatch):
    """models/ctrlora with a base and a LoRA, models/controlnet with CtrLoRA and other files."""
    models = tmp_path / "models"
    ctrlora, controlnet = models / "ctrlora", models / "controlnet"
    (ctrlora / "sub").mkdir(parents=True)
    controlnet.mkdir()
    os.link(small.paths["base"], ctrlora / "base.safetensors")
    os.link(small.paths["a"], ctrlora / "sub" / "a.safetensors")
    os.link(small.paths["base"], controlnet / "cn_base.safetensors")
    os.link(small.paths["b"], controlnet / "cn_lora.safetensors")
    torch.save({"input_hint_block.0.weight": torch.zeros(1)}, controlnet / "ctrlora_official.ckpt")
    torch.save({"input_hint_block.0.weight": torch.zeros(1)}, controlnet / "control_v11p_canny.pth")
    from safetensors.torch import save_file
    save_file({"input_hint_block.0.weight": torch.zeros(1), "input_blocks.0.0.weight": torch.zeros(1)},
              str(controlnet / "plain_cn.safetensors"))
    (controlnet / "notes.txt").write_text("not a model")
    fp = FakeFolderPaths(str(models), str(controlnet))
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return fp


def test_folder_is_registered_once_and_keeps_extra_paths(folders, tmp_path):
    model_files.register_folder(folders)
    model_files.register_folder(folders)
    paths, extensions = folders.folder_names_and_paths["ctrlora"]
    assert paths == [os.path.join(folders.models_dir, "ctrlora")] and ".ckpt" in extensions
    folders.folder_names_and_paths["ctrlora"] = ([str(tmp_path / "extra")], {".safetensors"})
    model_files.register_folder(folders)
    assert folders.folder_names_and_paths["ctrlora"][0] == [os.path.join(folders.models_dir, "ctrlora"),
                                                           str(tmp_path / "extra")]


def test_loaders_list_ctrlora_files_and_only_ctrlora_files_of_controlnet(folders):
    ctrlora = ["base.safetensors", "sub/a.safetensors"]
    assert model_files.list_files(FileKind.CTRLORA_BASE) == sorted(ctrlora + ["cn_base.safetensors",
                                                                              "ctrlora_official.ckpt"])
    assert model_files.list_files(FileKind.CTRLORA_LORA) == sorted(ctrlora + ["cn_lora.safetensors",
                                                                              "ctrlora_official.ckpt"])


def test_listing_reads_only_headers_and_keeps_one_answer_per_file(folders, small):
    """A CtrLoRA file in models/controlnet is classified from its header (its tensor data may be cut off)."""
    path = os.path.join(folders.folder_names_and_paths["controlnet"][0][0], "cut.safetensors")
    with open(small.paths["b"], "rb") as f:
        raw = f.read()
    header = 8 + int.from_bytes(raw[:8], "little")
    with open(path, "wb") as f:
        f.write(raw[:header + 16])
    assert "cut.safetensors" in model_files.list_files(FileKind.CTRLORA_LORA)
    assert "cut.safetensors" not in model_files.list_files(FileKind.CTRLORA_BASE)
    with open(small.paths["base"], "rb") as f:  # the file is replaced by a base: the answer follows
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[:8 + int.from_bytes(raw[:8], "little") + 16])
    assert "cut.safetensors" in model_files.list_files(FileKind.CTRLORA_BASE)
    assert [k for k in model_files._kind_cache if k.endswith("cut.safetensors")] == [os.path.realpath(path)]


def test_names_resolve_in_ctrlora_first_then_controlnet(folders):
    assert model_files.resolve("sub/a.safetensors").endswith(os.path.join("ctrlora", "sub", "a.safetensors"))
    assert model_files.resolve("cn_lora.safetensors").endswith(os.path.join("controlnet", "cn_lora.safetensors"))
    with pytest.raises(CheckpointError, match="missing.safetensors.*not found"):
        model_files.resolve("missing.safetensors")


def test_save_names_stay_inside_the_ctrlora_folder(folders):
    root = os.path.join(folders.models_dir, "ctrlora")
    assert model_files.output_path("blend") == os.path.join(root, "blend.safetensors")
    assert model_files.output_path("mine/blend.safetensors") == os.path.join(root, "mine", "blend.safetensors")
    for bad in ("../escape", "/abs/path", "a//b", "  ", "sub/../../x"):
        with pytest.raises(ValueError, match="save_name"):
            model_files.output_path(bad)


def test_lora_handle_keeps_metadata_not_tensors(small):
    handle = LoRAHandle.from_file(small.paths["a"], 0.8)
    assert handle.adapter is None and handle.info["rank"] == 4 and handle.info["condition"] == "cond_a"
    assert handle.summary() == "a, rank 4, condition cond_a, strength 0.8"
    assert handle.load().tensors.keys() == load_adapter(small.paths["a"]).tensors.keys()
    assert handle.identity == LoRAHandle.from_file(small.paths["a"], 0.8).identity
    with pytest.raises(CheckpointError, match="but a CtrLoRA condition LoRA was expected"):
        LoRAHandle.from_file(small.paths["base"], 1.0)


def test_condition_node_chains_and_normalises_images(small):
    lora = LoRAHandle.from_file(small.paths["a"], 1.0)
    (first,) = CtrLoRACondition().add(lora, torch.rand(1, 8, 8, 1), 0.5)
    (both,) = CtrLoRACondition().add(lora, torch.rand(2, 8, 8, 4), 0.25, first)
    assert len(first) == 1 and len(both) == 2 and both[0] is first[0]
    assert [c.weight for c in both] == [0.5, 0.25]
    assert both[0].image.shape == (1, 8, 8, 3) and both[1].image.shape == (2, 8, 8, 3)
    with pytest.raises(ConditionError, match="values must be in"):
        CtrLoRACondition().add(lora, torch.full((1, 8, 8, 3), 2.0), 1.0)
    with pytest.raises(ValueError, match="IMAGE"):
        CtrLoRACondition().add(lora, torch.rand(8, 8, 3), 1.0)
    with pytest.raises(TypeError, match="Load CtrLoRA LoRA"):
        CtrLoRACondition().add("not a lora", torch.rand(1, 8, 8, 3), 1.0)


def test_blend_node_is_the_core_blend_with_strengths_folded_in(small, folders):
    a = LoRAHandle.from_file(small.paths["a"], 0.5)
    b = LoRAHandle.from_file(small.paths["b"], 1.0)
    c = LoRAHandle.from_file(small.paths["c"], 1.0)
    out = CtrLoRABlendLoRAs().blend(a, 0.6, b, 0.3, lora_3=c, weight_3=0.1, save_name="blends/abc")
    (blended,) = out["result"]
    adapters = [load_adapter(small.paths[n]) for n in "abc"]
    for key in adapters[0].tensors:
        if key.endswith("lora_layer.up.weight"):
            adapters[0].tensors[key] = adapters[0].tensors[key] * 0.5  # strength of `a`
    expected, error = blend_adapters(adapters, [0.6, 0.3, 0.1])
    assert error == 0.0 and blended.strength == 1.0 and blended.info["rank"] == 12
    for key, value in expected.tensors.items():
        assert torch.allclose(blended.load().tensors[key], value)
    saved = os.path.join(folders.models_dir, "ctrlora", "blends", "abc.safetensors")
    assert load_adapter(saved).metadata["blend_of"] == "0.6*a + 0.3*b + 0.1*c"
    assert load_adapter(saved).metadata["condition"] == "cond_a"
    assert torch.equal(load_file(saved)["control_model.zero_convs.0.0.weight"],
                       expected.tensors["zero_convs.0.0.weight"])
    assert any(line.startswith("saved to ") for line in out["ui"]["text"])


def test_blend_node_refuses_loras_of_different_bases(small, tmp_path):
    other = random_base(ControlNetConfig(model_channels=32, channel_mult=(1, 1, 1, 1), context_dim=32), 1)
    save_adapter(random_adapter(other, 4, seed=3), tmp_path / "other.safetensors")
    a = LoRAHandle.from_file(small.paths["a"], 1.0)
    x = LoRAHandle.from_file(str(tmp_path / "other.safetensors"), 1.0)
    with pytest.raises(CheckpointError, match="different base models"):
        CtrLoRABlendLoRAs().blend(a, 0.5, x, 0.5)


def test_blend_lighting_seg_node_is_the_core_blend():
    lighting, seg = torch.rand(1, 16, 12, 3), torch.rand(2, 16, 12, 3)
    (out,) = CtrLoRABlendLightingSeg().blend(lighting, seg, 0.3, "overlay")
    assert torch.equal(out, blend_lighting_seg(lighting, seg, 0.3, "overlay"))
    with pytest.raises(ConditionError, match="same size"):
        CtrLoRABlendLightingSeg().blend(lighting, torch.rand(1, 8, 8, 3), 0.5, "alpha")
    assert CtrLoRABlendLightingSeg.INPUT_TYPES()["required"]["alpha"][1]["default"] == 0.3


def test_blend_node_flattens_transparent_maps_over_black_and_the_palette_background():
    lighting, seg = torch.rand(1, 4, 4, 3), torch.rand(1, 4, 4, 3)
    transparent = torch.zeros(1, 4, 4)
    transparent[:, 0, 0] = 1.0  # Load Image's mask: 1 = transparent
    (out,) = CtrLoRABlendLightingSeg().blend(lighting, seg, 0.3, "alpha", transparent, transparent)
    background = torch.tensor(DENTAL_PALETTE["background"]) / 255.0
    torch.testing.assert_close(out[0, 0, 0], 0.3 * background, rtol=0, atol=1e-6)  # 0.7 * black + 0.3 * grey
    assert torch.equal(out[:, 1:], blend_lighting_seg(lighting, seg, 0.3, "alpha")[:, 1:])
    # Load Image gives a 64x64 zero mask for a file without alpha: the image stays as it is
    (same,) = CtrLoRABlendLightingSeg().blend(lighting, seg, 0.3, "alpha", torch.zeros(1, 64, 64), None)
    assert torch.equal(same, blend_lighting_seg(lighting, seg, 0.3, "alpha"))
    with pytest.raises(ConditionError, match="transparency mask"):
        CtrLoRABlendLightingSeg().blend(lighting, seg, 0.3, "alpha", torch.ones(1, 8, 8))


def test_dental_prompt_from_widgets_or_file_name():
    node = CtrLoRADentalPrompt()
    assert node.prompt("lower", "left", "{jaw} jaw, {view}") == ("lower jaw, left",)
    assert node.prompt("lower", "left", "{jaw} jaw, {view}", "Upper_Front_0001.png") == ("upper jaw, front",)
    assert node.prompt("upper", "top", DEFAULT_TEMPLATE)[0].startswith("a 3D dental model of upper teeth, top view")
    with pytest.raises(PromptError, match="unknown placeholder"):
        node.prompt("upper", "top", "{tooth}")
    with pytest.raises(PromptError, match="molar.png: no jaw word"):
        node.prompt("upper", "top", "{jaw}", "molar.png")


@pytest.mark.parametrize(("file_name", "expected"), [
    ("lighting_lower_patient7_bottom.png", "lower/bottom/"),
    ("seg_lower_patient7_bottom.png", "lower/bottom/"),
    ("matt_upper_smith_right_1.png", "upper/right/"),
    ("unlit_upper_smith_front_top_left.png", "upper/front/top left"),
    ("lower_XY12ZW34_front_slightly_up.png", "lower/front/slightly up"),
    ("upper_AB12CD34_front_weight_5.png", "upper/front/"),
    ("  mandible_left.png ", "lower/left/"),
])
def test_dental_prompt_parses_the_users_file_names(file_name, expected):
    assert CtrLoRADentalPrompt().prompt("upper", "top", "{jaw}/{view}/{view_detail}", file_name) == (expected,)


def test_block_multipliers():
    residuals = [torch.zeros(1, 1, h, h) for h in (64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8, 8)]
    assert block_multipliers("constant", residuals, 64) == [1.0] * 13
    soft = block_multipliers("soft", residuals, 64)
    assert soft[-1] == 1.0 and soft[0] == pytest.approx(0.825 ** 12)
    assert block_multipliers("resolution", residuals, 64) == [1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="block weighting"):
        block_multipliers("linear", residuals, 64)
