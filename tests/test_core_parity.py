"""Numerical parity with the official CtrLoRA implementation (fixtures in tests/parity/data).

The fixtures were produced by the official code (see tests/parity/README.md) from random
non-zero weights; here our loader and forward pass read the same files and must give the
same 13 residuals up to float32 rounding: the official float32 result may be as far from our
float64 run as a small multiple of our own float32 run's distance (tests/float_reference.py).
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ctrlora_core.api import control_residuals
from ctrlora_core.config import infer_config
from ctrlora_core.formats import load_base, read_tensors
from float_reference import assert_float32_close

DATA = os.path.join(os.path.dirname(__file__), "parity", "data")
CONFIG = json.load(open(os.path.join(DATA, "config.json")))
INPUTS = load_file(os.path.join(DATA, "inputs.safetensors"))
EXPECTED = load_file(os.path.join(DATA, "expected.safetensors"))


def expected_case(name: str) -> list[torch.Tensor]:
    return [EXPECTED[f"{name}.{i}"] for i in range(13)]


@pytest.mark.parametrize("case", sorted(CONFIG["cases"]))
def test_residuals_match_official(case):
    spec = CONFIG["cases"][case]
    ours = {dtype: control_residuals(
        os.path.join(DATA, "base.safetensors"),
        [os.path.join(DATA, f"{name}.safetensors") for name in spec["loras"]],
        spec["lora_weights"] or None,
        spec["strength"],
        hints=[INPUTS[h] for h in spec["hints"]],
        timesteps=INPUTS["timesteps"],
        context=INPUTS["context"],
        dtype=dtype,
    ) for dtype in (torch.float32, torch.float64)}
    official = expected_case(case)
    assert len(ours[torch.float32]) == len(official) == 13
    assert_float32_close(official, ours[torch.float32], ours[torch.float64])


def test_ckpt_and_safetensors_lora_give_identical_results():
    common = dict(lora_weights=None, strength=1.0, hints=[INPUTS["hint_a"]],
                  timesteps=INPUTS["timesteps"], context=INPUTS["context"])
    base = os.path.join(DATA, "base.safetensors")
    a = control_residuals(base, [os.path.join(DATA, "lora_a.safetensors")], **common)
    b = control_residuals(base, [os.path.join(DATA, "lora_a.ckpt")], **common)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_config_inferred_from_official_base_matches_fixture_config():
    tensors = read_tensors(os.path.join(DATA, "base.safetensors"))
    trunk = {k.removeprefix("control_model."): v for k, v in tensors.items() if "lora_layer" not in k}
    cfg = infer_config(trunk)
    official = CONFIG["control_model"]
    assert cfg.model_channels == official["model_channels"]
    assert list(cfg.channel_mult) == official["channel_mult"]
    assert cfg.num_res_blocks == (official["num_res_blocks"],) * len(official["channel_mult"])
    assert cfg.context_dim == official["context_dim"]
    levels_with_attention = [2 ** i for i, on in enumerate(cfg.attention_levels) if on]
    assert sorted(levels_with_attention) == sorted(official["attention_resolutions"])


def test_base_ignores_leftover_lora_tensors():
    model = load_base(os.path.join(DATA, "base.safetensors"))
    assert not any("lora_layer" in k for k in model.state_dict())
