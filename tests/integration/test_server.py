"""End to end through a real headless ComfyUI (CPU, loopback) with the pack in custom_nodes/.

Every example workflow is converted to API format with the server's own /object_info,
shrunk to 64 px and 2 steps, queued through /prompt and must write an image. Then: the
LoRA's weights change the image, Apply CtrLoRA chains with core Apply ControlNet on both
sides, and bad inputs give node errors after which the server still runs a good prompt.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from ComfyUI_CtrLoRA import nodes as pack

from testbed import fake_models
from testbed.comfy_host import PACK_ROOT
from testbed.comfy_server import execution_error, output_images
from testbed.workflow_api import CORE_NODES, slots_from_object_info, to_api
from .conftest import PACK_NAME

EXAMPLES = {os.path.splitext(os.path.basename(p))[0]: p
            for p in sorted(glob.glob(os.path.join(PACK_ROOT, "example_workflows", "*.json")))}
SIZE, STEPS = 64, 2


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get("/object_info")


def example_prompt(name: str, object_info: dict) -> dict:
    """The example workflow `name` in API format, at 64 px and 2 steps."""
    with open(EXAMPLES[name]) as f:
        prompt = to_api(json.load(f), lambda node_type: slots_from_object_info(object_info[node_type]))
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=SIZE, height=SIZE, batch_size=1)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = STEPS
    return prompt


def node_id(prompt: dict, class_type: str, index: int = 0) -> str:
    return [k for k, v in prompt.items() if v["class_type"] == class_type][index]


def save_as(prompt: dict, prefix: str) -> dict:
    prompt = copy.deepcopy(prompt)
    prompt[node_id(prompt, "SaveImage")]["inputs"]["filename_prefix"] = prefix
    return prompt


def run_image(server, prompt: dict) -> np.ndarray:
    """Run `prompt`, require success and exactly one saved image; return it as float array."""
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    saved = [p for p in output_images(entry, server.base_dir) if os.path.isfile(p)]
    assert len(saved) == 1, entry.get("outputs")
    with Image.open(saved[0]) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_pack_loads_every_node(comfy_server, object_info):
    assert f"(IMPORT FAILED): {os.path.join(comfy_server.base_dir, 'custom_nodes', PACK_NAME)}" \
        not in comfy_server.log_tail(200_000)
    for node_type, display in pack.NODE_DISPLAY_NAME_MAPPINGS.items():
        info = object_info[node_type]
        assert info["display_name"] == display
        assert info["category"] == "CtrLoRA"
        assert info["python_module"] == f"custom_nodes.{PACK_NAME}"


def test_loaders_list_ctrlora_folder_and_ctrlora_files_of_controlnet_folder(object_info):
    ctrlora_folder = {fake_models.BASE, fake_models.DENTAL_LORA, fake_models.SEG_LORA, fake_models.MISMATCHED_LORA}
    for node_type, name in (("CtrLoRABaseLoader", "base_name"), ("CtrLoRALoRALoader", "lora_name")):
        listed = set(object_info[node_type]["input"]["required"][name][0])
        # the .ckpt in models/controlnet is listed (named ctrlora*); the plain ControlNet is not
        assert listed == ctrlora_folder | {fake_models.DEPTH_LORA}


def test_core_node_table_matches_this_comfyui(object_info):
    for node_type, expected in CORE_NODES.items():
        assert slots_from_object_info(object_info[node_type]) == expected["slots"], node_type
        assert object_info[node_type]["output"] == expected["outputs"], node_type


def test_example_workflows_are_served_as_templates(comfy_server):
    """Every host lists them and serves their JSON; a thumbnail (<name>.jpg beside each) is served
    where the host serves more than JSON from example_workflows/ (0.3.64 and 0.8.0 mount the folder;
    the newest, app/custom_node_manager.py@fcd026bf, answers 404 for anything but .json)."""
    assert sorted(comfy_server.get("/workflow_templates")[PACK_NAME]) == sorted(EXAMPLES)
    for name, path in EXAMPLES.items():
        served = comfy_server.get(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        with open(path) as f:
            assert served == json.load(f)
        thumbnail = os.path.splitext(path)[0] + ".jpg"
        with open(thumbnail, "rb") as f:
            assert f.read(3) == b"\xff\xd8\xff", thumbnail
        try:
            with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/{PACK_NAME}/{name}.jpg") as r:
                assert r.headers["Content-Type"] == "image/jpeg" and r.read(3) == b"\xff\xd8\xff"
        except urllib.error.HTTPError as err:
            assert err.code == 404, err  # a host that serves template JSON only


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_workflow_runs_and_writes_an_image(comfy_server, object_info, name):
    image = run_image(comfy_server, save_as(example_prompt(name, object_info), f"example_{name}"))
    assert image.shape == (SIZE, SIZE, 3)
    assert image.std() > 0


def test_lora_weights_change_the_image(comfy_server, object_info):
    prompt = example_prompt("dental_single_condition", object_info)
    loader = node_id(prompt, "CtrLoRALoRALoader")
    with_lora = run_image(comfy_server, save_as(prompt, "lora_on"))
    again = run_image(comfy_server, save_as(prompt, "lora_on_again"))
    no_update = save_as(prompt, "lora_strength0")
    no_update[loader]["inputs"]["strength"] = 0.0  # only the low-rank update is switched off
    without_update = run_image(comfy_server, no_update)
    no_control = save_as(prompt, "no_control")
    ksampler = no_control[node_id(prompt, "KSampler")]["inputs"]
    ksampler["positive"], ksampler["negative"] = [node_id(prompt, "CLIPTextEncode", 0), 0], \
        [node_id(prompt, "CLIPTextEncode", 1), 0]
    without_control = run_image(comfy_server, no_control)

    assert np.array_equal(with_lora, again)  # same inputs, same pixels: differences below are real
    assert np.abs(with_lora - without_update).mean() > 1.0
    assert np.abs(with_lora - without_control).mean() > 1.0


def test_second_condition_changes_the_image(comfy_server, object_info):
    prompt = example_prompt("dental_multi_condition", object_info)
    second = node_id(prompt, "CtrLoRACondition", 1)
    both = run_image(comfy_server, save_as(prompt, "two_conditions"))
    muted = save_as(prompt, "second_weight0")
    muted[second]["inputs"]["weight"] = 0.0
    assert np.abs(both - run_image(comfy_server, muted)).mean() > 1.0


def test_chains_with_core_apply_controlnet_before_and_after(comfy_server, object_info):
    prompt = save_as(example_prompt("dental_single_condition", object_info), "chained")
    ctrlora_only = run_image(comfy_server, save_as(prompt, "ctrlora_only"))
    apply, ksampler = node_id(prompt, "CtrLoRAApply"), node_id(prompt, "KSampler")
    prompt["cn_loader"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": fake_models.CONTROLNET}}
    prompt["cn_image"] = {"class_type": "LoadImage", "inputs": {"image": "upper_front_depth.png"}}

    def core_apply(positive: list, negative: list) -> dict:
        return {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": positive, "negative": negative, "control_net": ["cn_loader", 0], "image": ["cn_image", 0],
            "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}}

    apply_inputs = prompt[apply]["inputs"]
    prompt["cn_before"] = core_apply(apply_inputs["positive"], apply_inputs["negative"])
    apply_inputs["positive"], apply_inputs["negative"] = ["cn_before", 0], ["cn_before", 1]
    prompt["cn_after"] = core_apply([apply, 0], [apply, 1])
    prompt[ksampler]["inputs"]["positive"], prompt[ksampler]["inputs"]["negative"] = ["cn_after", 0], ["cn_after", 1]
    chained = run_image(comfy_server, prompt)
    assert np.abs(chained - ctrlora_only).mean() > 1.0


def test_bad_inputs_give_node_errors_and_the_server_keeps_working(comfy_server, object_info):
    good = example_prompt("dental_single_condition", object_info)
    apply, base_loader, lora_loader = (node_id(good, t) for t in ("CtrLoRAApply", "CtrLoRABaseLoader",
                                                                 "CtrLoRALoRALoader"))

    no_vae = copy.deepcopy(good)
    del no_vae[apply]["inputs"]["vae"]
    status, answer = comfy_server.queue(no_vae)
    # The condition preview does not depend on Apply CtrLoRA, so ComfyUI accepts the prompt for
    # that output only (200) and reports the node error; with no valid output it answers 400.
    assert status in (200, 400)
    assert [e["type"] for e in answer["node_errors"][apply]["errors"]] == ["required_input_missing"]
    assert answer["node_errors"][apply]["errors"][0]["extra_info"]["input_name"] == "vae"
    if status == 200:
        entry = comfy_server.wait(answer["prompt_id"])
        assert not [p for p in output_images(entry, comfy_server.base_dir)]  # the image was not made

    def failure(prompt: dict) -> dict:
        entry = comfy_server.run(prompt)
        assert entry["status"]["status_str"] == "error"
        return execution_error(entry)

    lora_as_base = copy.deepcopy(good)
    lora_as_base[base_loader]["inputs"]["base_name"] = fake_models.DENTAL_LORA
    error = failure(lora_as_base)
    assert error["node_id"] == base_loader
    assert fake_models.DENTAL_LORA in error["exception_message"]
    assert "CtrLoRA condition LoRA file, but a CtrLoRA base ControlNet was expected" in error["exception_message"]

    base_as_lora = copy.deepcopy(good)
    base_as_lora[lora_loader]["inputs"]["lora_name"] = fake_models.BASE
    error = failure(base_as_lora)
    assert error["node_id"] == lora_loader
    assert "but a CtrLoRA condition LoRA was expected" in error["exception_message"]

    mismatched = copy.deepcopy(good)
    mismatched[lora_loader]["inputs"]["lora_name"] = fake_models.MISMATCHED_LORA
    error = failure(mismatched)
    assert error["node_id"] == apply
    assert fake_models.MISMATCHED_LORA in error["exception_message"]
    assert "different base" in error["exception_message"]

    image = run_image(comfy_server, save_as(good, "after_errors"))
    assert image.shape == (SIZE, SIZE, 3)
