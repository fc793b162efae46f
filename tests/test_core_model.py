"""CtrLoRA ControlNet: architecture, adapters (single, multi, merged, blended), memory sharing.

Two float32 routes to one result are compared through a float64 run of the model (see
tests/float_reference.py): they may differ by what float32 rounding explains on these weights.
"""
import copy
import math

import pytest
import torch

from ctrlora_core.adapters import CtrLoRAAdapter, blend_adapters, merged_adapter, stack_adapters
from ctrlora_core.config import ControlNetConfig, infer_config
from ctrlora_core.controlnet import CtrLoRAControlNet
from ctrlora_core.random_weights import SMALL_CONFIG, random_adapter, random_base
from float_reference import assert_float32_apart, assert_float32_close


@pytest.fixture(scope="module")
def model():
    return random_base(SMALL_CONFIG, seed=0)


@pytest.fixture(scope="module")
def model64(model):
    """The same model in float64: the reference for float32 rounding."""
    return copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(5)
    return dict(hint=torch.randn(2, 4, 16, 16, generator=g), hint2=torch.randn(2, 4, 16, 16, generator=g),
                hint3=torch.randn(2, 4, 16, 16, generator=g),
                t=torch.tensor([999, 17]), ctx=torch.randn(2, 6, 32, generator=g))


def run(model, hint, inputs, stack=None):
    """Residuals in the model's dtype (the stack is cast to it by the model)."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model(hint.to(dtype), inputs["t"], inputs["ctx"].to(dtype), adapters=stack)


def test_residuals_are_contiguous_nchw(model, inputs):
    """The host UNet adds the residuals to its NCHW activations; a channels-last residual
    (from the transformer's rearrange) slowed ComfyUI's sampling steps by ~40% on CPU."""
    adapter = random_adapter(model, 8, 1, "a")
    for stack in (None, stack_adapters([adapter])):
        for residual in run(model, inputs["hint"], inputs, stack):
            assert residual.is_contiguous(), residual.stride()


def test_inference_merged_lora_path_equals_low_rank_path(model, model64, inputs, monkeypatch):
    """Without autograd, wide layers with many tokens run through per-adapter merged weights."""
    import ctrlora_core.layers as ops

    stack = stack_adapters([random_adapter(model, 8, 1, "a"), random_adapter(model, 4, 2, "b")], [0.6, 0.4])
    hints = torch.cat([inputs["hint"], inputs["hint2"]])
    merged_calls = []
    merged = ops._merged_per_adapter
    monkeypatch.setattr(ops, "_merged_per_adapter", lambda *a: merged_calls.append(1) or merged(*a))
    fast = run(model, hints, inputs, stack)
    assert merged_calls  # the merged path really ran
    calls = len(merged_calls)
    with torch.enable_grad():
        low_rank = model(hints, inputs["t"], inputs["ctx"], adapters=stack)
    assert len(merged_calls) == calls  # ... and training (autograd) keeps the low-rank path
    assert_float32_close(fast, [r.detach() for r in low_rank], run(model64, hints, inputs, stack))


def test_two_adapters_equal_weighted_sum_of_single_runs(model, model64, inputs):
    a, b = random_adapter(model, 8, 1, "a"), random_adapter(model, 4, 2, "b")  # different ranks
    singles = [(run(m, inputs["hint"], inputs, stack_adapters([a])), run(m, inputs["hint2"], inputs, stack_adapters([b])))
               for m in (model, model64)]
    both = run(model, torch.cat([inputs["hint"], inputs["hint2"]]), inputs, stack_adapters([a, b], [0.7, 0.3]))
    assert_float32_close(both, *([0.7 * x + 0.3 * y for x, y in zip(ra, rb)] for ra, rb in singles))
    (ra, rb), (ra64, _) = singles
    assert_float32_apart(rb, ra, ra64)  # the two conditions really differ


def test_lora_strength_scales_the_weight_update(model, model64, inputs):
    a = random_adapter(model, 8, 1)
    half = stack_adapters([a], lora_strengths=[0.5])
    with merged_adapter(model, a, strength=0.5):
        merged = run(model, inputs["hint"], inputs)
    assert_float32_close(merged, run(model, inputs["hint"], inputs, half), run(model64, inputs["hint"], inputs, half))


def test_merged_path_equals_forward_time_path_and_restores_weights(model, model64, inputs):
    a = random_adapter(model, 8, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward_time = run(model, inputs["hint"], inputs, stack_adapters([a]))
    with merged_adapter(model, a):
        merged = run(model, inputs["hint"], inputs)
    assert_float32_close(merged, forward_time, run(model64, inputs["hint"], inputs, stack_adapters([a])))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fresh_adapter_reproduces_the_base(model, model64, inputs):
    fresh = CtrLoRAAdapter.fresh(model, 16, torch.Generator().manual_seed(0))
    assert all(torch.count_nonzero(fresh.lora_pair(m)[1]) == 0 for m in fresh.lora_modules())
    with_fresh = run(model, inputs["hint"], inputs, stack_adapters([fresh]))
    assert_float32_close(with_fresh, run(model, inputs["hint"], inputs), run(model64, inputs["hint"], inputs))


def test_adapter_changes_every_residual_but_the_first_through_lora(model, model64, inputs):
    a = random_adapter(model, 8, 4)
    only_lora = CtrLoRAAdapter(dict(a.tensors))
    base_sets = CtrLoRAAdapter.fresh(model, 8)
    for m in only_lora.set_modules():  # keep the base's zero convs and norms
        only_lora.tensors[m + ".weight"], only_lora.tensors[m + ".bias"] = base_sets.set_pair(m)
    base, base64 = run(model, inputs["hint"], inputs), run(model64, inputs["hint"], inputs)
    lora = run(model, inputs["hint"], inputs, stack_adapters([only_lora]))
    assert_float32_close(lora[:1], base[:1], base64[:1])  # conv_in + zero conv 0 have no Linear in their path
    assert_float32_apart(lora[1:], base[1:], base64[1:])


def test_three_adapters_hold_one_copy_of_the_base(model, inputs):
    base_storages = {p.data_ptr() for p in model.parameters()}
    adapters = [random_adapter(model, 8, s) for s in (1, 2, 3)]
    stack1, stack3 = stack_adapters(adapters[:1]), stack_adapters(adapters)
    hints = torch.cat([inputs["hint"], inputs["hint2"], inputs["hint3"]])
    run(model, hints, inputs, stack3)
    assert {p.data_ptr() for p in model.parameters()} == base_storages  # nothing copied or re-allocated
    base_numel = sum(p.numel() for p in model.parameters())
    # the stack holds adapter tensors only: 3x one adapter, never a base-sized copy
    assert stack3.numel() == 3 * stack1.numel() == sum(a.numel() for a in adapters)
    assert stack3.numel() < base_numel


def test_blend_exact_equals_weighted_sum_of_updates(model, inputs):
    a, b = random_adapter(model, 8, 1), random_adapter(model, 8, 2)
    blended, err = blend_adapters([a, b], [0.6, 0.4])
    assert err == 0.0 and blended.rank == 16  # 0.0: no re-factoring happened, not a rounded result

    def weighted_updates(x, y, dtype):
        return [0.6 * (ux.to(dtype) @ dx.to(dtype)) + 0.4 * (uy.to(dtype) @ dy.to(dtype))
                for (dx, ux), (dy, uy) in ((x.lora_pair(m), y.lora_pair(m)) for m in a.lora_modules())]

    updates = [u @ d for d, u in map(blended.lora_pair, a.lora_modules())]
    assert_float32_close(updates, weighted_updates(a, b, torch.float32), weighted_updates(a, b, torch.float64))
    sets = {dtype: [0.6 * a.tensors[k].to(dtype) + 0.4 * b.tensors[k].to(dtype) for k in a.tensors if "lora" not in k]
            for dtype in (torch.float32, torch.float64)}
    assert_float32_close([blended.tensors[k] for k in a.tensors if "lora" not in k], *sets.values())


def test_blend_to_fixed_rank_reports_truncation_error(model):
    a, b = random_adapter(model, 8, 1), random_adapter(model, 8, 2)
    exact16, err16 = blend_adapters([a, b], [0.5, 0.5], rank=16)
    low, err4 = blend_adapters([a, b], [0.5, 0.5], rank=4)
    assert exact16.rank == 16 and err16 == 0.0  # the ranks add up to 16: concatenated, no SVD
    assert low.rank == 4 and 0.05 < err4 < 1.0


def test_gradients_reach_adapter_parameters_only(model, inputs):
    adapter = random_adapter(model, 4, 9)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in adapter.tensors.items()}
    stack = stack_adapters([CtrLoRAAdapter(params)])
    out = model(inputs["hint"], inputs["t"], inputs["ctx"], adapters=stack, gradient_checkpointing=True)
    sum(o.square().mean() for o in out).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    assert all(p.grad is None for p in model.parameters())  # the base stays frozen


def test_host_ops_are_used_for_every_layer():
    created = []

    class CountingLinear(torch.nn.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    ops = type("HostOps", (), dict(Linear=CountingLinear, Conv2d=torch.nn.Conv2d,
                                   GroupNorm=torch.nn.GroupNorm, LayerNorm=torch.nn.LayerNorm))
    model = CtrLoRAControlNet(SMALL_CONFIG, host_ops=ops)
    assert len(created) == len(model.lora_module_names()) == 82


@pytest.mark.parametrize("config", [
    ControlNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), attention_levels=(False, True),
                     context_dim=16, num_heads=4, use_linear_in_transformer=True, transformer_depth=2),
    ControlNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=(2, 2, 2),
                     attention_levels=(True, True, False), context_dim=24),
])
def test_config_round_trips_through_state_dict(config):
    model = CtrLoRAControlNet(config)
    assert infer_config(model.state_dict(), num_heads=config.num_heads) == config
    n_res = len(model(torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 5, config.context_dim)))
    assert n_res == len(model.zero_convs) + 1 == 1 + sum(config.num_res_blocks) + len(config.channel_mult)


@pytest.mark.slow
def test_full_size_sd15_layout_shapes_and_determinism():
    """Random full-size SD1.5 base: official key set, counts from the spec, 13 residual shapes, determinism."""
    model = random_base(ControlNetConfig(), seed=0)
    sd = model.state_dict()
    assert len(sd) == 324 and sum(v.numel() for v in sd.values()) == 360_192_640
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in sd
    assert "input_blocks.4.0.skip_connection.weight" in sd and "input_hint_block.0.weight" not in sd
    adapter = random_adapter(model, 128, 1)
    assert len(adapter.tensors) == 246 and adapter.numel() == 36_945_536
    hint = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    t, ctx = torch.tensor([500]), torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    stack = stack_adapters([adapter])
    with torch.no_grad():
        out1 = model(hint, t, ctx, adapters=stack)
        out2 = model(hint, t, ctx, adapters=stack)
    widths = [320] * 4 + [640] * 3 + [1280] * 6
    sizes = [32] * 3 + [16] * 3 + [8] * 3 + [4] * 4
    assert [tuple(o.shape) for o in out1] == [(1, c, s, s) for c, s in zip(widths, sizes)]
    assert all(torch.equal(a, b) and torch.isfinite(a).all() for a, b in zip(out1, out2))
    assert math.isclose(sum(p.numel() for p in model.parameters()), 360_192_640)
