"""Apply CtrLoRA's control object inside ComfyUI's machinery (ComfyUI imported as a library, CPU).

The control is driven the way ComfyUI's sampler drives it (get_models -> load_models_gpu ->
pre_run -> get_control), on a small random base, and its residuals are compared with
`ctrlora_core.api.control_residuals`, the reference computation. The library is imported through the pack (`ComfyUI_CtrLoRA.ctrlora_core`), the copy the nodes use,
so the error classes the nodes raise are the ones these tests catch.
"""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ComfyUI_CtrLoRA.ctrlora_core.adapters import stack_adapters
from ComfyUI_CtrLoRA.ctrlora_core.api import control_residuals
from ComfyUI_CtrLoRA.ctrlora_core.config import ControlNetConfig
from ComfyUI_CtrLoRA.ctrlora_core.errors import CheckpointError
from ComfyUI_CtrLoRA.ctrlora_core.formats import load_adapter, load_base
from ComfyUI_CtrLoRA.ctrlora_core.random_weights import SMALL_CONFIG, randomize_, write_random_files
from float_reference import EPS32, assert_float32_apart, assert_float32_close
from testbed.refusal import tensors_kept_by_refusal

WEIGHTS = (0.5, 0.3, 0.2)


@pytest.fixture(scope="module")
def lib(comfy_lib):
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.model_sampling
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from ComfyUI_CtrLoRA.nodes import base_model, ctrlora_control
    from ComfyUI_CtrLoRA.nodes.apply import CtrLoRAApply, CtrLoRACondition
    from ComfyUI_CtrLoRA.nodes.handles import LoRAHandle

    class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    return SimpleNamespace(comfy=comfy, mm=mm, sd=comfy.sd, AutoencoderKL=AutoencoderKL, base_model=base_model,
                           control=ctrlora_control, Apply=CtrLoRAApply, Condition=CtrLoRACondition,
                           LoRAHandle=LoRAHandle, model=SimpleNamespace(model_sampling=Sampling()))


@pytest.fixture(autouse=True)
def empty_residual_cache():
    """Every test computes its residuals (and encodes its images) afresh."""
    from ComfyUI_CtrLoRA.nodes.residual_cache import SHARED

    SHARED.clear()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_random_files(tmp_path_factory.mktemp("small"), SMALL_CONFIG, rank=4, lora_names=("a", "b", "c"))


@pytest.fixture(scope="module")
def vae(lib):
    """A full-size SD VAE with random weights (the architecture ComfyUI detects as SD's)."""
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    model = lib.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    randomize_(model, torch.Generator().manual_seed(0))
    return lib.sd.VAE(sd=model.state_dict())


@pytest.fixture(scope="module")
def base(lib, files):
    return lib.base_model.load_base_handle(files["base"])


@pytest.fixture
def image():
    """A condition image whose aspect differs from the latent's (80 x 96 px)."""
    return torch.rand(1, 80, 96, 3, generator=torch.Generator().manual_seed(1))


def conditions(lib, files, names, image, weights=None, strength=1.0):
    out = None
    for name, weight in zip(names, weights or [1.0] * len(names)):
        lora = lib.LoRAHandle.from_file(files[name], strength)
        out = lib.Condition().add(lora, image, weight, out)[0]
    return out


def conditioning(batch=1, seed=2):
    context = torch.randn(2 * batch, 77, SMALL_CONFIG.context_dim, generator=torch.Generator().manual_seed(seed))
    return [[context[:batch], {}]], [[context[batch:], {}]], context


def sample_step(lib, tops, x, timestep=500.0, context=None, batched_number=2):
    """One model call as ComfyUI's sampler makes it for the top-level controls `tops`
    (comfy/sampler_helpers.py get_additional_models: get_models, then the memory estimate, per control)."""
    models = []
    for c in tops:
        models += c.get_models()
        c.inference_memory_requirements(x.dtype)
    lib.mm.load_models_gpu(models)
    for c in tops:
        c.pre_run(lib.model, lib.model.model_sampling.percent_to_sigma)
    sigma = lib.model.model_sampling.sigma(torch.full((x.shape[0],), timestep))
    outs = [c.get_control(x, sigma, {"c_crossattn": context}, batched_number, {}) for c in tops]
    return outs, lib.model.model_sampling.timestep(sigma), models


def flat(control: dict) -> list[torch.Tensor]:
    return control["output"] + control["middle"]


def core(files: dict[str, str], names: list[str], weights: list[float] | None, strength: float,
         hints: list[torch.Tensor], timestep: torch.Tensor, context: torch.Tensor) -> list[list[torch.Tensor]]:
    """`control_residuals` in float32 and float64: the twin and the reference that bound how far
    ComfyUI's float32 run may be from the exact residuals (tests/float_reference.py)."""
    return [control_residuals(files["base"], [files[n] for n in names], weights, strength, hints, timestep, context,
                              dtype=dtype) for dtype in (torch.float32, torch.float64)]


def assert_same_run(got: list[torch.Tensor], expected: list[torch.Tensor], offset: float = 0.0) -> None:
    """The same network on the same inputs (the same float32 operations: equal bits on one machine),
    rescaled or shifted by constants on either side in whatever order: value by value at most one
    float32 rounding of |value| + |constants added| apart."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert ((g - e).abs() <= EPS32 * (e.abs() + offset)).all(), float((g - e).abs().max())


def apply(lib, base, conds, vae, positive, negative, **options):
    options = dict(dict(strength=1.0, start_percent=0.0, end_percent=1.0), **options)
    return lib.Apply().apply(positive, negative, base, conds, vae, **options)


def top_control(conditioning_out):
    return conditioning_out[0][1]["control"]


def test_single_condition_merges_the_lora_and_matches_core(lib, files, base, vae, image):
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    pos, neg = apply(lib, base, conditions(lib, files, ["a"], image, [0.7]), vae, positive, negative)
    control = top_control(pos)
    assert control is top_control(neg)  # cond and uncond share one control (so they batch together)
    (out,), timestep, models = sample_step(lib, [control], x, context=context)

    assert models == [base.patcher] and base.merged_key == control.merge_key  # merged weights
    assert len(base.patcher.patches) == len(base.module.lora_module_names()) + 2 * len(base.module.set_module_names())
    hints = [latent.expand(2, -1, -1, -1) for latent in control._latents]
    assert_float32_close(flat(out), *core(files, ["a"], [0.7], 1.0, hints, timestep, context))
    assert_float32_apart(flat(out), *core(files, [], None, 1.0, hints, timestep, context))  # the LoRA acts
    control.cleanup()


def test_lora_strength_scales_only_the_low_rank_update(lib, files, base, vae, image):
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    outs = {}
    for strength in (1.0, 0.0):
        pos, _ = apply(lib, base, conditions(lib, files, ["a"], image, strength=strength), vae, positive, negative)
        (out,), timestep, _ = sample_step(lib, [top_control(pos)], x, context=context)
        outs[strength] = flat(out)
    hint = top_control(pos)._latents[0].expand(2, -1, -1, -1)
    stack = stack_adapters([load_adapter(files["a"])], lora_strengths=[0.0])
    zero_update = []  # float32 twin, float64 reference
    for dtype in (torch.float32, torch.float64):
        with torch.no_grad():
            zero_update.append(load_base(files["base"], dtype=dtype)(hint.to(dtype), timestep, context.to(dtype),
                                                                     adapters=stack))
    assert_float32_close(outs[0.0], *zero_update)
    # residual 0 comes from conv_in and a zero conv only (no Linear): the update cannot touch it
    assert torch.equal(outs[1.0][0], outs[0.0][0])
    assert_float32_apart(outs[1.0][1:], *(z[1:] for z in zero_update))


def _tensors_in(value) -> list[torch.Tensor]:
    """The tensors inside a ModelPatcher patch list (tuples, weight adapters)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return _tensors_in(value.weights) if hasattr(value, "weights") else []


def test_a_new_apply_of_the_merged_lora_replaces_the_older_copy_without_merging_again(lib, files, base, vae, image):
    """A prompt that failed, then the same LoRA applied again: the patcher must hold the new copy only."""
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    controls = []
    for _ in range(2):
        controls.append(top_control(apply(lib, base, conditions(lib, files, ["a"], image), vae, positive,
                                          negative)[0]))
        (out,), timestep, _ = sample_step(lib, controls[-1:], x, context=context)
        if len(controls) == 1:
            merged = base.patcher.patches_uuid
    assert base.merged_key == controls[1].merge_key and base.patcher.patches_uuid == merged  # merged once
    held = {t.untyped_storage().data_ptr() for patch in base.patcher.patches.values() for t in _tensors_in(patch)}
    first, second = ({t.untyped_storage().data_ptr() for part in (c.stack.lora, c.stack.sets) for pair in part.values()
                      for t in pair} for c in controls)
    assert held and held <= first | second and not held & first  # both stacks alive: addresses are distinct
    hints = [latent.expand(2, -1, -1, -1) for latent in controls[1]._latents]
    assert_float32_close(flat(out), *core(files, ["a"], [1.0], 1.0, hints, timestep, context))
    for control in controls:
        control.cleanup()


def test_three_conditions_share_one_base_and_sum_with_weights(lib, files, base, vae, image):
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    pos, _ = apply(lib, base, conditions(lib, files, ["a", "b", "c"], image, list(WEIGHTS)), vae, positive, negative)
    control = top_control(pos)
    (out,), timestep, models = sample_step(lib, [control], x, context=context)

    assert models == [base.patcher] and base.merged_key is None and not base.patcher.patches
    ctrlora_models = [m for m in lib.mm.current_loaded_models if m.model.model is base.module]
    assert len(ctrlora_models) == 1  # one base copy in ComfyUI's model management
    assert control._run_stack.count == 3
    hints = [latent.expand(2, -1, -1, -1) for latent in control._latents]
    singles = [core(files, [n], [w], 1.0, [h], timestep, context) for n, w, h in zip("abc", WEIGHTS, hints)]
    weighted_sums = [[sum(parts) for parts in zip(*(s[d] for s in singles))] for d in (0, 1)]
    assert_float32_close(flat(out), *weighted_sums)
    control.cleanup()
    assert control._run_stack is None and control._latents is None


def test_two_chained_single_condition_applies_with_different_loras(lib, files, base, vae, image):
    """Two clones with different merged LoRAs cannot share one module: both must still be right."""
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    pos_a, neg_a = apply(lib, base, conditions(lib, files, ["a"], image, [0.8]), vae, positive, negative)
    pos_b, neg_b = apply(lib, base, conditions(lib, files, ["b"], image, [0.6]), vae, pos_a, neg_a, strength=0.5)
    control_b = top_control(pos_b)
    assert control_b.previous_controlnet is top_control(pos_a)
    (out,), timestep, models = sample_step(lib, [control_b], x, context=context)

    assert models == [base.patcher, base.patcher] and base.merged_key is None
    hint_a = control_b.previous_controlnet._latents[0].expand(2, -1, -1, -1)
    hint_b = control_b._latents[0].expand(2, -1, -1, -1)
    a = core(files, ["a"], [0.8], 1.0, [hint_a], timestep, context)
    b = core(files, ["b"], [0.6], 0.5, [hint_b], timestep, context)
    assert_float32_close(flat(out), *([ra + rb for ra, rb in zip(a[d], b[d])] for d in (0, 1)))
    control_b.cleanup()

    # the next run with only one of them merges its LoRA again, and is still right
    (out,), timestep, _ = sample_step(lib, [top_control(pos_a)], x, context=context)
    assert base.merged_key == top_control(pos_a).merge_key
    assert_float32_close(flat(out), *a)


def test_condition_image_reaches_the_vae_in_unit_range_resized_like_core(lib, files, base, vae, image):
    seen = []
    hook = vae.first_stage_model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        positive, negative, context = conditioning(batch=2)
        x = torch.randn(4, 4, 8, 8)  # 2 cond + 2 uncond
        pos, _ = apply(lib, base, conditions(lib, files, ["a"], image), vae, positive, negative)
        (out,), _, _ = sample_step(lib, [top_control(pos)], x, context=context)
    finally:
        hook.remove()
    (encoder_input,) = seen
    # centre crop 96 x 80 -> 80 x 80, then nearest-exact to the latent's 8 x 8 times 8 px
    expected = F.interpolate(image.movedim(-1, 1)[..., :, 8:88], size=(64, 64), mode="nearest-exact")
    assert encoder_input.min() >= 0 and encoder_input.max() <= 1
    assert torch.allclose(encoder_input.float(), expected, atol=1e-6)
    control = top_control(pos)
    assert control._latents[0].shape == (1, 4, 8, 8)
    assert all(r.shape[0] == 4 for r in flat(out))  # the batch-1 hint was expanded to the 4 rows
    assert control._hint_rows(4, 2) == [[0, 0, 0, 0]]


def test_strength_percent_range_and_zero_strength(lib, files, base, vae, image):
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    conds = conditions(lib, files, ["a", "b"], image)
    assert apply(lib, base, conds, vae, positive, negative, strength=0.0) == (positive, negative)

    outs = {}
    for strength in (1.0, 2.0):
        pos, _ = apply(lib, base, conds, vae, positive, negative, strength=strength)
        (out,), _, _ = sample_step(lib, [top_control(pos)], x, context=context)
        outs[strength] = flat(out)
    assert_same_run(outs[2.0], [2 * r for r in outs[1.0]])

    pos, _ = apply(lib, base, conds, vae, positive, negative, start_percent=0.5, end_percent=1.0)
    (early,), _, _ = sample_step(lib, [top_control(pos)], x, timestep=900.0, context=context)
    (late,), _, _ = sample_step(lib, [top_control(pos)], x, timestep=100.0, context=context)
    assert early is None and late is not None


def fixed_control(lib, shapes, value):
    """Stands in for any other control in the chain: constant residuals, plus its previous one's."""

    class Fixed(lib.comfy.controlnet.ControlBase):
        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            prev = None
            if self.previous_controlnet is not None:
                prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
            residuals = [torch.full(s, value) for s in shapes]
            return self.control_merge({"output": residuals[:-1], "middle": residuals[-1:]}, prev, None)

    return Fixed()


def test_chains_with_other_controls_before_and_after(lib, files, base, vae, image):
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    pos, _ = apply(lib, base, conditions(lib, files, ["a", "b"], image), vae, positive, negative)
    (alone,), _, _ = sample_step(lib, [top_control(pos)], x, context=context)
    alone = [r.clone() for r in flat(alone)]
    shapes = [tuple(r.shape) for r in alone]

    before = fixed_control(lib, shapes, 0.25)
    positive_with_prev = [[positive[0][0], {"control": before}]]
    negative_with_prev = [[negative[0][0], {"control": before}]]
    pos, _ = apply(lib, base, conditions(lib, files, ["a", "b"], image), vae, positive_with_prev, negative_with_prev)
    assert top_control(pos).previous_controlnet is before
    (out,), _, _ = sample_step(lib, [top_control(pos)], x, context=context)
    assert_same_run(flat(out), [r + 0.25 for r in alone], offset=0.25)

    after = fixed_control(lib, shapes, -1.0).set_previous_controlnet(top_control(pos))
    (out,), _, models = sample_step(lib, [after], x, context=context)
    assert base.patcher in models
    assert_same_run(flat(out), [r + 0.25 - 1.0 for r in alone], offset=1.25)


def test_block_weighting_soft_and_resolution(lib, files, base, vae, image):
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    conds = conditions(lib, files, ["a", "b"], image)
    outs = {}
    for mode in ("constant", "soft", "resolution"):
        pos, _ = apply(lib, base, conds, vae, positive, negative, block_weighting=mode)
        (out,), _, _ = sample_step(lib, [top_control(pos)], x, context=context)
        outs[mode] = flat(out)
    n = len(outs["constant"])
    assert_same_run(outs["soft"], [r * 0.825 ** (n - 1 - i) for i, r in enumerate(outs["constant"])])
    assert_same_run(outs["resolution"], [r * (8 / r.shape[-2]) for r in outs["constant"]])
    assert {8 / r.shape[-2] for r in outs["constant"]} == {1.0, 2.0, 4.0, 8.0}


def test_apply_to_uncond_off_leaves_the_negative_alone(lib, files, base, vae, image):
    positive, negative, _ = conditioning()
    pos, neg = apply(lib, base, conditions(lib, files, ["a"], image), vae, positive, negative, apply_to_uncond=False)
    assert neg is negative and "control" in pos[0][1] and "control" not in positive[0][1]


def test_bad_inputs_raise_clear_errors(lib, files, base, vae, image, tmp_path):
    positive, negative, _ = conditioning()
    conds = conditions(lib, files, ["a"], image)
    with pytest.raises(ValueError, match="needs the SD VAE"):
        apply(lib, base, conds, None, positive, negative)
    with pytest.raises(ValueError, match="the list is empty"):
        apply(lib, base, (), vae, positive, negative)
    with pytest.raises(TypeError, match="Load CtrLoRA Base ControlNet"):
        apply(lib, "not a base", conds, vae, positive, negative)

    other = write_random_files(tmp_path, ControlNetConfig(model_channels=32, channel_mult=(1, 1, 1, 1), context_dim=32),
                               rank=4, lora_names=("x",))
    mismatched = conditions(lib, other, ["x"], image)
    with pytest.raises(CheckpointError, match="x.safetensors.*different base model"):
        apply(lib, base, mismatched, vae, positive, negative)
    with pytest.raises(CheckpointError, match="but a CtrLoRA base ControlNet was expected"):
        lib.base_model.load_base_handle(files["a"])
    with pytest.raises(CheckpointError, match="but a CtrLoRA condition LoRA was expected"):
        lib.LoRAHandle.from_file(files["base"], 1.0)


def test_refused_apply_reads_no_lora_and_keeps_none_of_what_it_read(lib, files, base, vae, image, tmp_path,
                                                                   monkeypatch):
    positive, negative, _ = conditioning()
    other = write_random_files(tmp_path / "other", ControlNetConfig(model_channels=32, channel_mult=(1, 1, 1, 1),
                                                                     context_dim=32), rank=4, lora_names=("x",))
    mixed = lib.Condition().add(lib.LoRAHandle.from_file(other["x"], 1.0), image, 1.0,
                                conditions(lib, files, ["a"], image))[0]

    def no_reading(self):
        raise AssertionError(f"{self.path} was read")

    with monkeypatch.context() as patched:
        patched.setattr(lib.LoRAHandle, "load", no_reading)
        with pytest.raises(CheckpointError, match="x.safetensors.*different base model"):
            apply(lib, base, mixed, vae, positive, negative)

    damaged = tmp_path / "damaged.safetensors"  # fits the base; its values turn NaN after it was picked
    shutil.copy(files["b"], damaged)
    conds = lib.Condition().add(lib.LoRAHandle.from_file(str(damaged), 1.0), image, 1.0,
                                conditions(lib, files, ["a"], image))[0]
    tensors = load_file(str(damaged))
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, str(damaged))
    err, kept = tensors_kept_by_refusal(apply, lib, base, conds, vae, positive, negative)
    assert "NaN" in str(err) and kept == [], f"the kept error holds {len(kept)} tensors or storages"


def test_a_failed_base_load_registers_no_handle(lib, files, tmp_path):
    tensors = load_file(files["base"])
    key = next(k for k in tensors if k.endswith("input_blocks.0.0.weight"))
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    damaged = tmp_path / "damaged_base.safetensors"
    save_file(tensors, str(damaged))
    before = dict(lib.base_model._handles)
    err, kept = tensors_kept_by_refusal(lib.base_model.load_base_handle, str(damaged))
    assert "NaN or infinite" in str(err) and kept == []
    assert dict(lib.base_model._handles) == before


def test_loaders_of_one_file_share_one_module(lib, files, base):
    again = lib.base_model.load_base_handle(files["base"])
    assert again is base and again.module is base.module


def test_low_vram_loading_patches_per_forward_with_the_same_result(lib, files, vae, image):
    """--lowvram: ComfyUI casts weights per layer and applies the patches in forward (LowVramPatch)."""
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    base = lib.base_model.load_base_handle(files["base"], dtype=torch.float32)  # its own module
    pos, _ = apply(lib, base, conditions(lib, files, ["a"], image, [0.7]), vae, positive, negative)
    control = top_control(pos)
    (full,), timestep, _ = sample_step(lib, [control], x, context=context)
    full = [r.clone() for r in flat(full)]

    base.patcher.unpatch_model(torch.device("cpu"))
    base.patcher.load(torch.device("cpu"), lowvram_model_memory=1, full_load=False)
    assert base.module.model_lowvram and base.module.lowvram_patch_counter > 0
    sigma = lib.model.model_sampling.sigma(torch.full((2,), 500.0))
    low = control.get_control(x, sigma, {"c_crossattn": context}, 2, {})
    hints = [latent.expand(2, -1, -1, -1) for latent in control._latents]
    twin, reference = core(files, ["a"], [0.7], 1.0, hints, timestep, context)
    assert_float32_close(full, twin, reference)
    assert_float32_close(flat(low), twin, reference)
    base.patcher.unpatch_model(torch.device("cpu"))


def core_control_residuals(lib, files, names, hints, timestep, context, dtype):
    """ComfyUI's own ControlNet (comfy.cldm) on the same trunk, as core would run these conditions.

    One cldm ControlNet per condition, its LoRA merged into the trunk in float32 (as ModelPatcher
    merges), in `dtype` with ComfyUI's ops for it. The CtrLoRA base has no hint block, so the hint
    path is all zeros (cldm adds nothing) and the condition latent goes where cldm takes x. The
    residuals are summed over the conditions (condition weights 1.0).
    """
    from comfy.cldm.cldm import ControlNet

    cfg = SMALL_CONFIG
    depth = [cfg.transformer_depth if attention else 0
             for attention, blocks in zip(cfg.attention_levels, cfg.num_res_blocks) for _ in range(blocks)]
    trunk = load_base(files["base"]).state_dict()
    total = None
    for name, hint in zip(names, hints):
        adapter = load_adapter(files[name])
        weights = dict(trunk)
        for module in adapter.lora_modules():
            down, up = adapter.lora_pair(module)
            weights[module + ".weight"] = trunk[module + ".weight"] + up @ down
        for module in adapter.set_modules():
            weights[module + ".weight"], weights[module + ".bias"] = adapter.set_pair(module)
        model = ControlNet(image_size=32, in_channels=cfg.in_channels, hint_channels=3,
                           model_channels=cfg.model_channels, num_res_blocks=list(cfg.num_res_blocks),
                           channel_mult=cfg.channel_mult, transformer_depth=depth,
                           transformer_depth_middle=cfg.transformer_depth, context_dim=cfg.context_dim,
                           num_heads=cfg.num_heads, use_spatial_transformer=True,
                           use_linear_in_transformer=cfg.use_linear_in_transformer, legacy=False,
                           dtype=dtype, device="cpu", operations=lib.comfy.ops.pick_operations(dtype, None))
        weights = {k: v.to(dtype) for k, v in weights.items()}
        weights.update({k: torch.zeros_like(v) for k, v in model.state_dict().items()
                        if k.startswith("input_hint_block.")})
        model.load_state_dict(weights)
        no_hint = torch.zeros(hint.shape[0], 3, 8 * hint.shape[-2], 8 * hint.shape[-1], dtype=dtype)
        with torch.no_grad():
            out = model(hint.to(dtype), no_hint, timestep, context.to(dtype))
        out = out["output"] + out["middle"]
        total = out if total is None else [a + b for a, b in zip(total, out)]
    return total


def rms_drift(half: list[torch.Tensor], single: list[torch.Tensor]) -> float:
    """Mean over residuals of ||half - single|| / ||single|| (in float64)."""
    return sum(float((h.double() - s.double()).norm() / s.double().norm()) for h, s in zip(half, single)) / len(single)


def test_half_precision_weights_and_compute(lib, files, vae, image, monkeypatch):
    """As on a GPU that computes in fp16: fp16 weights, no manual cast (ResBlock norms run in fp32).

    The fp16 error is held against what ComfyUI's own ControlNet loses on the same weights and
    inputs, not against a fixed bound: how much a random network amplifies rounding depends on
    the draw and on the CPU's kernels. Ours may lose at most 1.5 x core's (rms over residuals).
    32 x 32 latents: at 8 x 8 the deepest level is 1 x 1, its GroupNorms normalise 2 values per
    group (a sign function), and any rounding flips outputs at random, ours or core's alike.
    """
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(lib.mm, "unet_manual_cast", lambda *args, **kwargs: None)
    results = {}
    for dtype in (torch.float16, torch.float32):
        base = lib.base_model.load_base_handle(files["base"], dtype=dtype)
        assert base.compute_dtype == dtype and next(base.module.parameters()).dtype == dtype
        pos, _ = apply(lib, base, conditions(lib, files, ["a", "b"], image), vae, positive, negative)
        control = top_control(pos)
        (out,), timestep, _ = sample_step(lib, [control], x, context=context)
        results[dtype] = flat(out)
        hints = [latent.expand(2, -1, -1, -1) for latent in control._latents]
    for half in results[torch.float16]:
        assert half.dtype == torch.float16 and torch.isfinite(half).all()
    core = {dtype: core_control_residuals(lib, files, ["a", "b"], hints, timestep, context, dtype)
            for dtype in (torch.float16, torch.float32)}
    ours = rms_drift(results[torch.float16], results[torch.float32])
    theirs = rms_drift(core[torch.float16], core[torch.float32])
    # The same function: in float32 the two routes differ by float32 rounding (~2**-23 relative, a
    # network deep), far below float16's (~2**-10); a wrong or missing term would be >= 1e-2.
    assert rms_drift(results[torch.float32], core[torch.float32]) <= 0.1 * theirs
    print(f"fp16 vs fp32 residual drift (rms, relative): CtrLoRA {ours:.3e}, ComfyUI ControlNet {theirs:.3e}")
    assert ours <= 1.5 * theirs + 1e-4, f"fp16 drift {ours:.2e} vs ComfyUI's ControlNet {theirs:.2e}"
