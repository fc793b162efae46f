"""Apply CtrLoRA computes its control once per distinct input: batch rows, and re-runs through the residual cache.

Driven like tests/integration/test_control.py (ComfyUI as a library, CPU, the small random
base). The "plain path" is what the control computed before: the Base ControlNet run on
every row of the model call.
"""
from __future__ import annotations

import gc
import os
import shutil
from contextlib import contextmanager

import pytest
import torch

from ComfyUI_CtrLoRA.nodes.residual_cache import SHARED

from .test_control import (apply, base, conditioning, conditions, files, fixed_control, flat, image,  # noqa: F401
                           lib, sample_step, top_control, vae)

WEIGHTS = (0.5, 0.3, 0.2)


@pytest.fixture(autouse=True)
def empty_residual_cache():
    SHARED.clear()


@contextmanager
def counting(base, vae):
    """Rows the Base ControlNet computes per call, and calls of the VAE encoder."""
    seen = {"rows": [], "encodes": 0}

    def count_encode(*_):
        seen["encodes"] += 1

    hooks = [base.module.register_forward_pre_hook(lambda module, args: seen["rows"].append(args[0].shape[0])),
             vae.first_stage_model.encoder.register_forward_pre_hook(count_encode)]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def batch_context(batch: int, seed: int = 2) -> tuple[list, list, torch.Tensor]:
    """Positive/negative conditioning and the context ComfyUI hands the control for a batch of `batch`."""
    positive, negative, context = conditioning(seed=seed)
    cond, uncond = context[:1], context[1:]
    return positive, negative, torch.cat([cond.expand(batch, -1, -1), uncond.expand(batch, -1, -1)])


def plain_residuals(control, base, timestep, context, hints) -> list[torch.Tensor]:
    """The control's residuals computed on every row, as before the dedupe (constant block weighting)."""
    hint = torch.cat(hints)
    with torch.no_grad():
        if control.merge_key is not None and base.merged_key == control.merge_key:
            return [r * float(control.stack.weights[0]) for r in base.module(hint, timestep, context)]
        return base.module(hint, timestep, context, adapters=control._run_stack)


def run(lib, base, vae, conds, positive, negative, x, context, timestep=500.0, **options):
    """One model call of a run (then the run's cleanup): residuals, rows computed, VAE encodes."""
    pos, _ = apply(lib, base, conds, vae, positive, negative, **options)
    control = top_control(pos)
    with counting(base, vae) as seen:
        (out,), _, _ = sample_step(lib, [control], x, timestep=timestep, context=context)
    residuals = [r.clone() for r in flat(out)] if out is not None else None
    control.cleanup()
    return residuals, seen


def relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    assert [g.shape for g in got] == [e.shape for e in expected]
    return max(((g - e).abs().max() / e.abs().max()).item() for g, e in zip(got, expected))


@pytest.mark.parametrize("names", [["a"], ["a", "b", "c"]], ids=["one_lora_merged", "three_conditions"])
def test_batch_of_four_runs_the_base_on_two_rows_and_equals_the_plain_path(lib, files, base, vae, image, names):
    positive, negative, context = batch_context(4)
    x = torch.randn(8, 4, 8, 8)
    weights = [0.7] if len(names) == 1 else list(WEIGHTS)
    pos, _ = apply(lib, base, conditions(lib, files, names, image, weights), vae, positive, negative,
                   residual_cache=False)
    control = top_control(pos)
    with counting(base, vae) as seen:
        (out,), timestep, _ = sample_step(lib, [control], x, context=context)
    assert seen["rows"] == [2 * len(names)]  # one cond row + one uncond row per condition
    residuals = flat(out)
    assert all(r.shape[0] == 8 and r.stride(0) > 0 for r in residuals)  # every row materialised

    # bitwise: what the plain path computes for the two distinct rows (a batch of 1), row by row
    rows = [0, 4]
    distinct = plain_residuals(control, base, timestep[rows], context[rows],
                               [latent.expand(2, -1, -1, -1) for latent in control._latents])
    expand = [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(torch.equal(r, d[expand]) for r, d in zip(residuals, distinct))
    # the plain path on all 8 rows: equal up to float32 rounding, which CPU kernels do per batch size
    plain = plain_residuals(control, base, timestep, context, [latent.expand(8, -1, -1, -1)
                                                               for latent in control._latents])
    assert relative_error(residuals, plain) <= 1e-4
    residuals[0][0].zero_()  # rows do not share memory: writing one leaves the others
    assert all(torch.equal(residuals[0][row], distinct[0][0]) for row in (1, 2, 3))
    control.cleanup()


def test_rows_that_really_differ_are_all_computed(lib, files, base, vae):
    x = torch.randn(4, 4, 8, 8)
    # a batch of two different condition images: rows use image 0, 1, 0, 1
    images = torch.rand(2, 80, 96, 3, generator=torch.Generator().manual_seed(3))
    positive, negative, context = batch_context(2)
    pos, _ = apply(lib, base, conditions(lib, files, ["a", "b"], images), vae, positive, negative,
                   residual_cache=False)
    control = top_control(pos)
    with counting(base, vae) as seen:
        (out,), timestep, _ = sample_step(lib, [control], x, context=context)
    assert seen["rows"] == [2 * 4] and control._hint_rows(4, 2) == [[0, 1, 0, 1]] * 2
    hints = [lib.comfy.controlnet.broadcast_image_to(latent, 4, 2) for latent in control._latents]
    assert all(torch.equal(r, p) for r, p in zip(flat(out), plain_residuals(control, base, timestep, context, hints)))
    control.cleanup()

    # one image, but every row its own prompt (e.g. area conds of different prompts batched together)
    context = torch.randn(4, 77, context.shape[-1], generator=torch.Generator().manual_seed(4))
    _, seen = run(lib, base, vae, conditions(lib, files, ["a"], images[:1]), positive, negative, x, context)
    assert seen["rows"] == [4]


def test_a_rerun_takes_the_residuals_and_latents_from_the_cache_bit_identical(lib, files, base, vae, image):
    positive, negative, context = batch_context(1)
    x = torch.randn(2, 4, 8, 8)
    conds = conditions(lib, files, ["a", "b"], image, [0.6, 0.4])
    first, seen = run(lib, base, vae, conds, positive, negative, x, context, strength=2.0)
    # both conditions use the same image: one latent, encoded once; rows: 2 conditions x (cond, uncond)
    assert seen == {"rows": [4], "encodes": 1} and len(SHARED) == 1 + 2
    noise = torch.randn_like(x)  # a new seed: another noisy latent, the same residuals
    again, seen = run(lib, base, vae, conds, positive, negative, noise, context, strength=2.0)
    assert seen == {"rows": [], "encodes": 0}
    assert all(torch.equal(a, f) for a, f in zip(again, first))  # (ComfyUI scaled the first run's in place)
    fresh, seen = run(lib, base, vae, conds, positive, negative, x, context, residual_cache=False, strength=2.0)
    assert seen == {"rows": [4], "encodes": 2}
    assert all(torch.equal(f, a) for f, a in zip(fresh, again))

    # the single-LoRA (merged) path too
    single = conditions(lib, files, ["c"], image, [0.8])
    first, seen = run(lib, base, vae, single, positive, negative, x, context)
    again, seen_again = run(lib, base, vae, single, positive, negative, noise, context)
    fresh, _ = run(lib, base, vae, single, positive, negative, x, context, residual_cache=False)
    assert seen["rows"] == [2] and seen_again["rows"] == []
    assert all(torch.equal(a, f) and torch.equal(f, g) for a, f, g in zip(again, first, fresh))


def test_every_key_part_changed_is_a_miss_with_the_right_result(lib, files, base, vae, image, monkeypatch):
    positive, negative, context = batch_context(1)
    x = torch.randn(2, 4, 8, 8)
    settings = dict(names=["a", "b"], image=image, weights=[0.5, 0.5], lora_strength=1.0, positive=positive,
                    negative=negative, context=context, x=x, timestep=500.0, options={})

    def run_with(residual_cache=True, **changes):
        s = dict(settings, **changes)
        conds = conditions(lib, files, s["names"], s["image"], s["weights"], s["lora_strength"])
        return run(lib, s.get("base", base), vae, conds, s["positive"], s["negative"], s["x"], s["context"],
                   s["timestep"], residual_cache=residual_cache, **s["options"])

    reference, seen = run_with()
    assert seen["rows"] == [4]
    other_positive, other_negative, other_context = batch_context(1, seed=7)
    monkeypatch.setattr(lib.mm, "unet_manual_cast", lambda *args, **kwargs: None)
    changes = {
        "condition image": dict(image=torch.rand(1, 80, 96, 3, generator=torch.Generator().manual_seed(5))),
        "LoRA identity": dict(names=["a", "c"]),
        "LoRA strength": dict(lora_strength=0.5),
        "condition weights": dict(weights=[0.3, 0.7]),
        "block weighting": dict(options=dict(block_weighting="soft")),
        "context": dict(positive=other_positive, negative=other_negative, context=other_context),
        "timestep": dict(timestep=400.0),
        "latent size": dict(x=torch.randn(2, 4, 16, 8)),
        "dtype (a base in fp16)": dict(base=lib.base_model.load_base_handle(files["base"], dtype=torch.float16)),
    }
    for part, change in changes.items():
        got, seen = run_with(**change)
        assert seen["rows"], f"{part}: a change must be a miss"
        expected, _ = run_with(residual_cache=False, **change)
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), part
        assert any(not torch.equal(g, r) for g, r in zip(got, reference)), part

    # Apply CtrLoRA's strength is applied after the cache (ComfyUI's control_merge): a hit, scaled
    doubled, seen = run_with(options=dict(strength=2.0))
    assert seen["rows"] == [] and all(torch.equal(d, 2 * r) for d, r in zip(doubled, reference))
    again, seen = run_with()
    assert seen["rows"] == [] and all(torch.equal(a, r) for a, r in zip(again, reference))


def test_the_cache_stays_within_its_budget(lib, files, base, vae, image, monkeypatch):
    positive, negative, context = batch_context(1)
    x = torch.randn(2, 4, 8, 8)
    conds = conditions(lib, files, ["a"], image)
    residuals, _ = run(lib, base, vae, conds, positive, negative, x, context, timestep=900.0)
    row_bytes = sum(r[0].numel() * r.element_size() for r in residuals)
    SHARED.clear()
    monkeypatch.setattr(SHARED, "budget_bytes", int(2.5 * row_bytes))  # two rows (cond, uncond) and the latent
    for timestep in (900.0, 800.0, 700.0):
        run(lib, base, vae, conds, positive, negative, x, context, timestep=timestep)
        assert SHARED.nbytes <= SHARED.budget_bytes
    assert len(SHARED) == 3  # the latent (used by every run) and the latest step's rows
    _, seen = run(lib, base, vae, conds, positive, negative, x, context, timestep=900.0)
    assert seen == {"rows": [2], "encodes": 0}  # step 900's rows were evicted: computed again


def test_cache_off_computes_every_run_as_before(lib, files, base, vae, image):
    positive, negative, context = batch_context(1)
    x = torch.randn(2, 4, 8, 8)
    conds = conditions(lib, files, ["a", "b"], image)
    pos, _ = apply(lib, base, conds, vae, positive, negative, residual_cache=False)
    assert top_control(pos).reuse is None
    outs = []
    for _ in range(2):
        out, seen = run(lib, base, vae, conds, positive, negative, x, context, residual_cache=False)
        assert seen == {"rows": [4], "encodes": 2}
        outs.append(out)
    assert len(SHARED) == 0
    cached, _ = run(lib, base, vae, conds, positive, negative, x, context)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*outs, cached))


def test_three_conditions_chained_with_a_percent_range_and_the_cache_on(lib, files, base, vae, image):
    positive, negative, context = batch_context(2)
    x = torch.randn(4, 4, 8, 8)
    conds = conditions(lib, files, ["a", "b", "c"], image, list(WEIGHTS))
    alone, _ = run(lib, base, vae, conds, positive, negative, x, context, timestep=100.0, residual_cache=False)
    before = fixed_control(lib, [tuple(r.shape) for r in alone], 0.25)
    chained = ([[positive[0][0], {"control": before}]], [[negative[0][0], {"control": before}]])
    SHARED.clear()
    outs = {}
    for attempt in ("first", "again"):
        for timestep in (900.0, 100.0):  # start_percent 0.5: the control is off early in sampling
            outs[attempt, timestep], seen = run(lib, base, vae, conds, *chained, x, context, timestep=timestep,
                                                start_percent=0.5, end_percent=1.0)
            computed = seen["rows"]
            assert computed == ([2 * 3] if (attempt, timestep) == ("first", 100.0) else [])
    assert all(torch.equal(r, torch.full_like(r, 0.25)) for r in outs["again", 900.0])  # only the previous one's
    assert all(torch.equal(a, f) for a, f in zip(outs["again", 100.0], outs["first", 100.0]))
    assert all(torch.equal(a, r + 0.25) for a, r in zip(outs["again", 100.0], alone))


def test_entries_go_when_the_base_or_the_vae_is_released(lib, files, vae, image, tmp_path):
    """Unloading (ComfyUI dropping the loader's output, e.g. "Free model and node cache") frees the entries."""
    path = os.path.join(tmp_path, "own_base.safetensors")
    shutil.copy(files["base"], path)
    own_base = lib.base_model.load_base_handle(path)
    positive, negative, context = batch_context(1)
    x = torch.randn(2, 4, 8, 8)
    run(lib, own_base, vae, conditions(lib, files, ["a"], image), positive, negative, x, context)
    token = SHARED.owner_token(own_base)
    assert sum(token in key[0] for key in SHARED._entries) == 2 and len(SHARED) == 3
    del own_base
    gc.collect()
    assert len(SHARED) == 1 and SHARED.nbytes == sum(t.numel() * t.element_size()
                                                    for entry, _ in SHARED._entries.values() for t in entry)
