"""What newer ComfyUI releases do to a control, reproduced on the hosts we can run (0.3.64, 0.8.0).

Each test stands in for one behaviour read in the newest ComfyUI source (0.38.x), named by
file@commit, and drives the pack's real code through it:

1. dynamic VRAM: `comfy.ops` Linear layers create their weights only when loaded;
2. the core patcher class (`CoreModelPatcher`, dynamic under dynamic VRAM) and weight
   patches applied when a layer's weight is cast for a forward, not merged in place;
3. `get_models()` called on node outputs while the graph runs, outside sampling;
4. multi-GPU sampling: `deepclone_multigpu` per extra device;
6. LoRA merges computed in half precision (`lora_compute_dtype`).

Plus the real sampler of the host (`comfy.sample.sample`) with a small SD1.5-layout UNet:
one condition must run the merged weights, never the forward-time adapter path.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping

import pytest
import torch

from ComfyUI_CtrLoRA.ctrlora_core.adapters import merged_adapter
from ComfyUI_CtrLoRA.ctrlora_core.api import control_residuals
from ComfyUI_CtrLoRA.ctrlora_core.controlnet import CtrLoRAControlNet
from ComfyUI_CtrLoRA.ctrlora_core.formats import load_adapter, load_base, read_tensors, scan_file
from ComfyUI_CtrLoRA.ctrlora_core.random_weights import SMALL_CONFIG, randomize_

from float_reference import assert_float32_close

from .test_control import (  # noqa: F401  (base, files, image, lib, vae are fixtures)
    apply, assert_same_run, base, conditioning, conditions, core, files, flat, image, lib, sample_step, top_control, vae)


def own_base(lib, files, tmp_path, dtype=None):
    """A handle of its own (a copy of the base file), so no other test shares its module or plan."""
    path = shutil.copy(files["base"], tmp_path / "own_base.safetensors")
    return lib.base_model.load_base_handle(str(path), dtype=dtype)


def module_calls(module):
    """Record the `adapters` argument of every forward of `module`; returns (list, hook handle)."""
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs.get("adapters")),
                                              with_kwargs=True)
    return calls, handle


# ---- 1. dynamic VRAM: lazy Linear weights

@pytest.fixture
def lazy_linear(lib, monkeypatch):
    """ComfyUI's Linear as dynamic VRAM makes it: no weight or bias until the state dict is loaded.

    Follows comfy/ops.py@0271a469 (`disable_weight_init.Linear.__init__`, `_load_from_state_dict`,
    `_lazy_load_from_state_dict`, taken when `comfy.memory_management.aimdo_enabled`): a class that
    does not bring its own `_load_from_state_dict` gets `weight = bias = None` (not parameters, so
    `state_dict()` lists no Linear keys); loading makes each given tensor a parameter as it is
    (dtype and device kept, cloned unless `assign=True`), other keys are unexpected, and a missing
    weight becomes zeros. The manual-cast Linear inherits both methods, so it is lazy too.
    """
    linear = lib.comfy.ops.disable_weight_init.Linear
    init, load = linear.__init__, linear._load_from_state_dict

    def brings_own_loader(module):
        return type(module)._load_from_state_dict is not linear._load_from_state_dict

    def lazy_init(self, in_features, out_features, bias=True, device=None, dtype=None):
        if brings_own_loader(self):
            return init(self, in_features, out_features, bias, device, dtype)
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = self.bias = None
        self.comfy_need_lazy_init_bias = bias
        self.weight_comfy_model_dtype = self.bias_comfy_model_dtype = dtype

    def lazy_load(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if brings_own_loader(self):
            return load(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        assign = local_metadata.get("assign_to_params_buffers", False)
        for key, value in state_dict.items():
            name = key[len(prefix):]
            if name in ("weight", "bias"):
                setattr(self, name, torch.nn.Parameter(value if assign else value.clone(), requires_grad=False))
            else:
                unexpected_keys.append(key)
        if self.weight is None:
            self.weight = torch.nn.Parameter(torch.zeros(self.in_features, self.out_features), requires_grad=False)
            missing_keys.append(prefix + "weight")
        if self.bias is None and self.comfy_need_lazy_init_bias:
            self.bias = torch.nn.Parameter(torch.zeros(self.out_features), requires_grad=False)
            missing_keys.append(prefix + "bias")

    monkeypatch.setattr(linear, "__init__", lazy_init)
    monkeypatch.setattr(linear, "_load_from_state_dict", lazy_load)


def test_base_loads_when_comfy_linear_weights_are_lazy(lib, files, base, lazy_linear, tmp_path, vae, image):
    ops = lib.base_model.host_ops(torch.float32, None)
    with torch.device("meta"):
        bare = CtrLoRAControlNet(SMALL_CONFIG, ops)
    assert not any(name.endswith("to_q.weight") for name in bare.state_dict())  # the stand-in is active

    lazy = own_base(lib, files, tmp_path, dtype=torch.float32)
    summary = scan_file(files["base"])
    file_tensors = {k[len(summary.prefix):]: v for k, v in read_tensors(files["base"]).items()}
    params = dict(lazy.module.named_parameters())
    assert params.keys() == {k for k in file_tensors if "lora_layer" not in k}
    for key, value in params.items():
        assert value.dtype == torch.float32 and torch.equal(value, file_tensors[key].float()), key

    # the same residuals as the module built with ComfyUI's eager layers (the `base` fixture)
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    outs = []
    for handle in (base, lazy):
        pos, _ = apply(lib, handle, conditions(lib, files, ["a", "b"], image), vae, positive, negative)
        (out,), _, _ = sample_step(lib, [top_control(pos)], x, context=context)
        outs.append([r.clone() for r in flat(out)])
    assert_same_run(outs[1], outs[0])


# ---- 2. the host's core patcher; weights as the host casts them

def test_base_uses_the_core_patcher_class_of_the_running_host(lib, files, tmp_path, monkeypatch):
    """comfy/model_patcher.py@08d0e510 ends with `CoreModelPatcher = ModelPatcher`, and main.py@02018c7e
    rebinds it to ModelPatcherDynamic at start-up when dynamic VRAM is on: the class is looked up
    when a model is loaded, as core ControlNets do (comfy/controlnet.py@03b1ca67)."""
    class HostCorePatcher(lib.comfy.model_patcher.ModelPatcher):
        pass

    monkeypatch.setattr(lib.comfy.model_patcher, "CoreModelPatcher", HostCorePatcher, raising=False)
    handle = own_base(lib, files, tmp_path)
    assert type(handle.patcher) is HostCorePatcher
    assert handle.patcher.model is handle.module and handle.patcher.load_device == lib.mm.get_torch_device()


def test_forward_time_adapters_see_weight_patches_applied_at_cast(lib, files, tmp_path, vae, image):
    """ModelPatcherDynamic.load (comfy/model_patcher.py@08d0e510) leaves weights offloaded and applies
    weight patches each time comfy/ops.py@0271a469 `cast_bias_weight` casts a layer for a forward
    (as low-VRAM loads do in every version). Stand-in: one weight function per Linear that adds a
    constant; the result must equal running with that constant written into the weights. A
    forward that read `layer.weight` itself would miss it."""
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    handle = own_base(lib, files, tmp_path, dtype=torch.float32)
    # the cache keys residuals by their inputs, not by weights changed behind the patcher's back as here
    pos, _ = apply(lib, handle, conditions(lib, files, ["a", "b"], image), vae, positive, negative,
                   residual_cache=False)
    control = top_control(pos)
    (plain,), timestep, _ = sample_step(lib, [control], x, context=context)
    plain = [r.clone() for r in flat(plain)]
    sigma = lib.model.model_sampling.sigma(torch.full((2,), 500.0))
    linears = [m for m in handle.module.modules() if isinstance(m, torch.nn.Linear)]
    shift = 0.02

    def run() -> list[torch.Tensor]:
        return [r.clone() for r in flat(control.get_control(x, sigma, {"c_crossattn": context}, 2, {}))]

    try:
        for m in linears:
            m.weight_function = [lambda w: w + shift]
        patched_at_cast = run()
    finally:
        for m in linears:
            m.weight_function = []
    with torch.no_grad():
        for m in linears:
            m.weight += shift
    written = run()
    assert_same_run(patched_at_cast, written)
    assert max((w - p).abs().max() / p.abs().max() for w, p in zip(written, plain)) > 1e-2  # the shift matters


# ---- 3. get_models() while the graph runs

def graph_time_get_models(comfy, outputs) -> None:
    """What the newest ComfyUI does with a node's outputs before the next node runs.

    comfy_execution/graph.py@0b458120 (ExecutionList.cache_link / cache_update) hands every
    consumed output to PromptModelTracker.add (comfy/model_patcher.py@08d0e510), which walks
    mappings, lists and tuples and calls `get_models()` on any object that has it. The real
    tracker is used where the host has one; otherwise this walk.
    """
    tracker_class = getattr(comfy.model_patcher, "PromptModelTracker", None)
    if tracker_class is not None:
        tracker = tracker_class()
        tracker.add(outputs)
        tracker.end()
        return
    if isinstance(outputs, Mapping):
        outputs = list(outputs.values())
    if isinstance(outputs, (list, tuple)):
        for output in outputs:
            graph_time_get_models(comfy, output)
    elif callable(getattr(outputs, "get_models", None)):
        outputs.get_models()


def test_get_models_outside_sampling_changes_nothing(lib, files, tmp_path, vae, image):
    """Two single-LoRA applies on one base; the graph touches both (several times, as cache hits
    and several consumers do), then a sampler uses only one: it must still run merged."""
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    handle = own_base(lib, files, tmp_path)
    applied = {name: apply(lib, handle, conditions(lib, files, [name], image, [0.7]), vae, positive, negative)
               for name in ("a", "b")}
    patches_uuid = handle.patcher.patches_uuid
    for _ in range(3):
        for name in ("a", "b"):
            graph_time_get_models(lib.comfy, [applied[name]])
    assert handle.patcher.patches_uuid == patches_uuid and handle.merged_key is None  # no plan was made

    calls, hook = module_calls(handle.module)
    try:
        for name in ("b", "a"):  # each sampled alone, with graph-time calls on both in between
            control = top_control(applied[name][0])
            (out,), timestep, models = sample_step(lib, [control], x, context=context)
            assert models == [handle.patcher] and handle.merged_key == control.merge_key
            assert calls and all(adapters is None for adapters in calls)  # the plain module ran
            hint = control._latents[0].expand(2, -1, -1, -1)
            assert_float32_close(flat(out), *core(files, [name], [0.7], 1.0, [hint], timestep, context))
            control.cleanup()
            calls.clear()
            graph_time_get_models(lib.comfy, [applied["a"], applied["b"]])
    finally:
        hook.remove()


def test_a_control_the_sampler_did_not_announce_still_runs_right(lib, files, tmp_path, vae, image):
    """A sampler that loads get_models() without the memory estimate (where controls join a run):
    the patcher must not keep another control's LoRA merged while this one runs."""
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    handle = own_base(lib, files, tmp_path)
    pos_a, _ = apply(lib, handle, conditions(lib, files, ["a"], image), vae, positive, negative)
    sample_step(lib, [top_control(pos_a)], x, context=context)
    assert handle.merged_key == top_control(pos_a).merge_key

    pos_b, _ = apply(lib, handle, conditions(lib, files, ["b"], image), vae, positive, negative)
    control = top_control(pos_b)
    lib.mm.load_models_gpu(control.get_models())
    control.pre_run(lib.model, lib.model.model_sampling.percent_to_sigma)
    sigma = lib.model.model_sampling.sigma(torch.full((2,), 500.0))
    out = control.get_control(x, sigma, {"c_crossattn": context}, 2, {})
    hint = control._latents[0].expand(2, -1, -1, -1)
    timestep = lib.model.model_sampling.timestep(sigma)
    assert_float32_close(flat(out), *core(files, ["b"], [1.0], 1.0, [hint], timestep, context))


# ---- 4. multi-GPU

def multigpu_clone_chain(top, device):
    """comfy/sampler_helpers.py@53757775 `preprocess_multigpu_conds` for one chain and one extra
    device: every control gets `deepclone_multigpu(device, autoregister=True)`, then each clone is
    linked to the clone of its previous control (`get_instance_for_device`)."""
    chain = []
    control = top
    while control is not None:
        chain.append(control)
        control = control.previous_controlnet
    for control in chain:
        if device not in control.multigpu_clones:
            control.deepclone_multigpu(device, autoregister=True)
    for control in chain:
        previous = control.previous_controlnet
        if previous is not None:
            control.multigpu_clones[device].set_previous_controlnet(previous.multigpu_clones.get(device, previous))
    return top.multigpu_clones[device]


def test_multigpu_clone_runs_on_its_own_copy_of_the_base(lib, files, tmp_path, vae, image):
    """The clone for a device (here a second "cpu" device) has its own module and patcher, gives the
    same residuals, and running it leaves the original's plan alone."""
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    handle = own_base(lib, files, tmp_path)
    pos_a, neg_a = apply(lib, handle, conditions(lib, files, ["a"], image, [0.8]), vae, positive, negative)
    pos_b, _ = apply(lib, handle, conditions(lib, files, ["b", "c"], image), vae, pos_a, neg_a, strength=0.5)
    top = top_control(pos_b)
    device = torch.device("cpu")

    clone = multigpu_clone_chain(top, device)
    previous_clone = top.previous_controlnet.multigpu_clones[device]
    assert type(clone) is type(top) and clone is not top and top.multigpu_clones == {device: clone}
    assert clone.previous_controlnet is previous_clone and clone.multigpu_clones == {}
    assert clone.base is previous_clone.base is not handle  # one copy per device, shared by its controls
    assert all(m is clone.base.patcher and m.load_device == device for m in clone.get_models())
    original = {p.data_ptr() for p in handle.module.parameters()}
    assert not original & {p.data_ptr() for p in clone.base.module.parameters()}

    (expected,), _, _ = sample_step(lib, [top], x, context=context)
    expected = [r.clone() for r in flat(expected)]
    original_patches = handle.patcher.patches_uuid
    (got,), _, _ = sample_step(lib, [clone], x, context=context)
    assert_same_run(flat(got), expected)
    assert handle.patcher.patches_uuid == original_patches
    top.cleanup()
    clone.cleanup()


# ---- 6. LoRA merges computed in half precision

def test_single_lora_merge_stays_within_the_fp16_bound(lib, files, tmp_path, vae, image, monkeypatch):
    """comfy/model_patcher.py@08d0e510 `patch_weight_to_device` merges in
    `lora_compute_dtype(device)` (comfy/model_management.py@02b2b388: float16 on most GPUs): each
    merged weight is fl16(fl16(W) + fl16(dW)) and each replaced tensor fl16(S), then stored in the
    weight dtype. Emulated here by pinning that dtype for the CPU, with float32 weights (the case
    where it loses the most: the merge rounds weights that would otherwise stay float32).

    Bound: storing the exact merged tensors in fp16 once moves each element by at most
    u = 2^-11 of its value; call the effect on the residuals `one_rounding` (measured on the same
    weights and inputs). The host rounds each merged Linear weight three times (W, dW, the sum),
    each by at most that much, and each replaced tensor once; the residuals depend linearly on
    such small weight errors, so the result stays within 3 x one_rounding (plus float32 noise).
    Seen on 0.8.0: 1.0 to 2.4 x; a bfloat16 merge (u = 2^-8) gives 7 to 39 x and fails.
    """
    if not hasattr(lib.mm, "LORA_COMPUTE_DTYPES"):
        pytest.skip("this ComfyUI merges LoRA weights in float32 (it has no lora_compute_dtype)")
    monkeypatch.setitem(lib.mm.LORA_COMPUTE_DTYPES, lib.mm.get_torch_device(), torch.float16)
    positive, negative, context = conditioning()
    x = torch.randn(2, 4, 8, 8)
    handle = own_base(lib, files, tmp_path, dtype=torch.float32)
    pos, _ = apply(lib, handle, conditions(lib, files, ["a"], image, [0.7]), vae, positive, negative)
    control = top_control(pos)
    (out,), timestep, _ = sample_step(lib, [control], x, context=context)
    assert handle.merged_key == control.merge_key
    hint = control._latents[0].expand(2, -1, -1, -1)
    exact = control_residuals(files["base"], [files["a"]], [0.7], 1.0, [hint], timestep, context)

    model = load_base(files["base"])
    adapter = load_adapter(files["a"], model)
    merged = [m + ".weight" for m in adapter.lora_modules()]  # what the host patches
    merged += [m + suffix for m in adapter.set_modules() for suffix in (".weight", ".bias")]
    with merged_adapter(model, adapter), torch.no_grad():
        for key in merged:
            p = model.get_parameter(key)
            p.copy_(p.half().float())
        one_rounding = [0.7 * r for r in model(hint, timestep, context)]
    for got, ref, rounded in zip(flat(out), exact, one_rounding):
        bound = 3 * (rounded - ref).abs().max() + 1e-5 * ref.abs().max()
        assert (got - ref).abs().max() <= bound


# ---- the host's own sampler: one condition runs merged

def small_sd15_unet(comfy):
    """An SD1.5-layout UNet sized like SMALL_CONFIG (so the base's residuals fit), random weights,
    in ComfyUI's model classes (comfy/model_detection.py's SD15 unet config, scaled down)."""
    import comfy.supported_models

    unet_config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4,
        "model_channels": SMALL_CONFIG.model_channels, "num_res_blocks": list(SMALL_CONFIG.num_res_blocks),
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": list(SMALL_CONFIG.channel_mult),
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": SMALL_CONFIG.context_dim,
        "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False}
    model = comfy.supported_models.SD15(unet_config).get_model({}, device=torch.device("cpu"))
    randomize_(model.diffusion_model, torch.Generator().manual_seed(3))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def test_host_sampler_runs_one_condition_through_the_merged_weights(lib, files, tmp_path, vae, image):
    """comfy.sample.sample: get_models + memory estimate, load, pre_run, get_control per step, as
    every host does (comfy/sampler_helpers.py, comfy/samplers.py); with graph-time get_models calls
    first, as the newest host makes them. The slow fallback (forward-time adapters) must not run."""
    import comfy.sample

    unet = small_sd15_unet(lib.comfy)
    positive, negative, _ = conditioning()
    handle = own_base(lib, files, tmp_path)
    applied = apply(lib, handle, conditions(lib, files, ["a"], image), vae, positive, negative)
    other = apply(lib, handle, conditions(lib, files, ["b"], image), vae, positive, negative)
    graph_time_get_models(lib.comfy, [applied, other])
    control = top_control(applied[0])
    latent = torch.zeros(1, 4, 8, 8)
    calls, hook = module_calls(handle.module)
    try:
        samples = comfy.sample.sample(unet, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)),
                                      2, 2.0, "euler", "normal", *applied, latent, seed=0, disable_pbar=True)
    finally:
        hook.remove()
    assert samples.shape == latent.shape and torch.isfinite(samples).all()
    assert handle.merged_key == control.merge_key is not None
    assert calls and all(adapters is None for adapters in calls)
