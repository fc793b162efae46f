#!/usr/bin/env python
"""Build small random-weight parity fixtures with the *official* CtrLoRA code.

The official repository (xyfJASON/ctrlora) is not vendored: it is imported at
run time from a source checkout given with ``--ctrlora-src``.  Only the model
modules are used; the sampler / Lightning / torchvision / omegaconf modules
that they import at top level are replaced by tiny stand-ins in
``sys.modules`` (they are never called by anything this script runs).

What the script does
--------------------
1. Builds a tiny ControlNet with the same block structure as SD1.5
   (12 input blocks + middle block, 13 residual outputs, 7 SpatialTransformers,
   82 Linear layers) but 64 channels everywhere.
2. Base file: an official ``ControlNetPretrain`` with one pretraining task,
   every parameter random (seeded) and non-zero, the task LoRA switched in,
   then filtered with the official ``tool_extract_weights.extract_control``
   (so the leftover ``lora_layer`` tensors are in the file, as in the real
   base checkpoint).
3. Condition LoRA files A and B: an official ``ControlNetFinetune``
   initialised from the base the way ``train_ctrlora_finetune.py`` does
   (every base key except those containing "lora"), then the parameters the
   official fine-tuning optimiser trains (LoRA layers, zero convs, names
   containing "norm") are replaced by random values, and the result is
   filtered with the official ``tool_extract_weights.extract_lora``.
4. Loads base + LoRA files from disk into the official
   ``ControlNetInference`` following ``api.py`` (base minus
   lora/zero-conv/norm keys; per LoRA: ``switch_lora(i)``, load,
   ``copy_weights_to_switchable()``), and computes the expected residuals by
   calling the official ``ControlInferenceLDM.apply_model`` with the VAE and
   the UNet replaced by stand-ins (identity encoder, a UNet that records the
   ``control`` list it receives).  An independent re-implementation of the
   scale / weighted-sum arithmetic is checked against it.
5. ``base_only``: the official ``ControlNetPretrain`` with no LoRA switched in
   (``lora_layer`` is None everywhere), loaded from the base file, i.e. the
   plain Base ControlNet with the base zero convs and norms.

Usage::

    python tests/parity/make_fixtures.py --ctrlora-src /tmp/ctrlora-src \
        --out tests/parity/data
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import math
import os
import sys
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

# --------------------------------------------------------------------------
# Fixture definition
# --------------------------------------------------------------------------

OFFICIAL_REPO = "xyfJASON/ctrlora"
OFFICIAL_COMMIT = "b4422b4"
PREFIX = "control_model."

#: Architecture: SD1.5 ControlNet structure, shrunk to 64 channels.
NET_CONFIG = dict(
    image_size=32,
    in_channels=4,
    hint_channels=3,
    model_channels=64,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 1, 1, 1],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=32,
    use_linear_in_transformer=False,
    use_checkpoint=False,
    legacy=False,
)
LORA_RANK = 8
NUM_OUTPUTS = 13

SEEDS = dict(construct=0, base=1, lora_a=2, lora_b=3, inputs=4)
TIMESTEPS = [999, 321]
BATCH = 2
LATENT_HW = 16
CONTEXT_TOKENS = 8
HALF_STRENGTH = 0.5
TWO_LORA_WEIGHTS = (0.7, 0.3)

# Random-init magnitudes (chosen so the 13 residuals are O(0.1..10)).
WEIGHT_GAIN = 1.0       # conv / linear weights: N(0, gain^2 / fan_in)
ZERO_CONV_GAIN = 0.5    # same rule, for the 13 output ("zero") convs
BIAS_STD = 0.1          # conv / linear biases
NORM_WEIGHT_STD = 0.2   # norm scale: 1 + N(0, std^2)
NORM_BIAS_STD = 0.1     # norm shift
LORA_UP_GAIN = 0.5      # LoRA up: N(0, gain^2 / rank); down: N(0, 1 / in)


# --------------------------------------------------------------------------
# Importing the official code
# --------------------------------------------------------------------------

def _stub_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__file__ = f"<parity stub for {name}>"
    sys.modules[name] = mod
    return mod


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


class _Unused:
    """Placeholder for official classes this script never instantiates."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} is a parity-fixture stub")


def install_stubs() -> list[str]:
    """Put stand-ins for sampling/training-only modules into sys.modules."""
    stubbed = []
    # The LDM / samplers pull in pytorch_lightning etc.; only class names are
    # needed (ControlLDM subclasses LatentDiffusion, modules import DDIMSampler).
    latent_diffusion = type("LatentDiffusion", (nn.Module,), {})
    sampler = type("DDIMSampler", (_Unused,), {})
    _stub_module("ldm.models.diffusion.ddpm", LatentDiffusion=latent_diffusion)
    _stub_module("ldm.models.diffusion.ddim", DDIMSampler=sampler)
    _stub_module("cldm.ddim_hacked", DDIMSampler=sampler)
    stubbed += ["ldm.models.diffusion.ddpm", "ldm.models.diffusion.ddim", "cldm.ddim_hacked"]
    if not _importable("torchvision.utils"):
        tv = _stub_module("torchvision")
        tv.utils = _stub_module("torchvision.utils", make_grid=_Unused)
        stubbed += ["torchvision", "torchvision.utils"]
    if not _importable("omegaconf"):
        # cldm.ControlNet only uses ListConfig for an isinstance-style check;
        # cldm.model imports OmegaConf for create_model, which is not used.
        list_config = type("ListConfig", (list,), {})
        om = _stub_module("omegaconf", OmegaConf=type("OmegaConf", (_Unused,), {}), ListConfig=list_config)
        om.listconfig = _stub_module("omegaconf.listconfig", ListConfig=list_config)
        stubbed += ["omegaconf", "omegaconf.listconfig"]
    return stubbed


def import_official(src: Path) -> SimpleNamespace:
    """Import the official modules needed to build/load/run the models."""
    src = src.resolve()
    for rel in ("cldm/cldm_ctrlora_inference.py", "scripts/tool_extract_weights.py", "api.py"):
        if not (src / rel).is_file():
            raise SystemExit(f"{src} does not look like a ctrlora checkout (missing {rel})")
    # Plain softmax attention in fp32 (the module reads this at import time).
    os.environ["ATTN_PRECISION"] = "fp32"
    sys.path.insert(0, str(src))
    stubbed = install_stubs()

    attention = importlib.import_module("ldm.modules.attention")
    # Force torch's plain attention even if xformers happens to be installed.
    attention.XFORMERS_IS_AVAILBLE = False

    spec = importlib.util.spec_from_file_location(
        "ctrlora_official_tool_extract_weights", src / "scripts" / "tool_extract_weights.py")
    extract_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract_tool)

    return SimpleNamespace(
        src=src,
        stubbed=stubbed,
        attention=attention,
        cldm=importlib.import_module("cldm.cldm"),
        lora=importlib.import_module("cldm.lora"),
        switchable=importlib.import_module("cldm.switchable"),
        pretrain=importlib.import_module("cldm.cldm_ctrlora_pretrain"),
        finetune=importlib.import_module("cldm.cldm_ctrlora_finetune"),
        inference=importlib.import_module("cldm.cldm_ctrlora_inference"),
        model_io=importlib.import_module("cldm.model"),
        extract_tool=extract_tool,
    )


class LDMShell(nn.Module):
    """Holds a ControlNet under ``control_model`` so state-dict keys carry the
    same ``control_model.`` prefix as in the official LDM / checkpoint files."""

    def __init__(self, control_model: nn.Module):
        super().__init__()
        self.control_model = control_model


def assert_plain_attention(off: SimpleNamespace, net: nn.Module) -> None:
    attn = off.attention
    assert attn.XFORMERS_IS_AVAILBLE is False
    assert attn._ATTN_PRECISION == "fp32"
    kinds = {type(m).__name__ for m in net.modules()
             if isinstance(m, (attn.CrossAttention, attn.MemoryEfficientCrossAttention))}
    assert kinds == {"CrossAttention"}, kinds


# --------------------------------------------------------------------------
# Random weights
# --------------------------------------------------------------------------

def _normal(shape, std: float, gen: torch.Generator, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


@torch.no_grad()
def randomize_conv_or_linear_(m: nn.Module, gen: torch.Generator, gain: float = WEIGHT_GAIN) -> None:
    fan_in = m.weight[0].numel()
    m.weight.copy_(_normal(m.weight.shape, gain / math.sqrt(fan_in), gen))
    if getattr(m, "bias", None) is not None:
        m.bias.copy_(_normal(m.bias.shape, BIAS_STD, gen))


@torch.no_grad()
def randomize_norm_(m: nn.Module, gen: torch.Generator) -> None:
    m.weight.copy_(_normal(m.weight.shape, NORM_WEIGHT_STD, gen, mean=1.0))
    m.bias.copy_(_normal(m.bias.shape, NORM_BIAS_STD, gen))


@torch.no_grad()
def randomize_lora_(layer: nn.Module, gen: torch.Generator) -> None:
    down, up = layer.down.weight, layer.up.weight          # [r, in], [out, r]
    down.copy_(_normal(down.shape, 1.0 / math.sqrt(down.shape[1]), gen))
    up.copy_(_normal(up.shape, LORA_UP_GAIN / math.sqrt(up.shape[1]), gen))


def is_zero_conv_name(name: str) -> bool:
    return "zero_convs" in name or "middle_block_out" in name


def randomize_everything_(off: SimpleNamespace, net: nn.Module, gen: torch.Generator) -> None:
    """Every conv / linear / norm (trunk and LoRA layers) gets random values."""
    lora_cls = off.lora.LoRALinearLayer
    lora_parts = set()
    for m in net.modules():
        if isinstance(m, lora_cls):
            lora_parts.update({id(m.down), id(m.up)})
    for name, m in net.named_modules():
        if isinstance(m, lora_cls):
            randomize_lora_(m, gen)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            randomize_norm_(m, gen)
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in lora_parts:
            gain = ZERO_CONV_GAIN if is_zero_conv_name(name) else WEIGHT_GAIN
            randomize_conv_or_linear_(m, gen, gain)


def randomize_condition_params_(off: SimpleNamespace, net: nn.Module, gen: torch.Generator) -> None:
    """Stand-in for fine-tuning: new random values for exactly the modules the
    official fine-tuning optimiser updates (LoRA layers, zero convs, norms
    whose module name contains 'norm')."""
    for name, m in net.named_modules():
        if isinstance(m, off.lora.LoRALinearLayer):
            randomize_lora_(m, gen)
        elif is_zero_conv_name(name) and isinstance(m, nn.Conv2d):
            randomize_conv_or_linear_(m, gen, ZERO_CONV_GAIN)
        elif "norm" in name and isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            randomize_norm_(m, gen)


# --------------------------------------------------------------------------
# Key bookkeeping
# --------------------------------------------------------------------------

def key_kind(key: str) -> str:
    if "lora_layer" in key:
        return "lora"
    if is_zero_conv_name(key):
        return "zero_conv"
    if "norm" in key:
        return "norm"
    return "trunk"


def is_condition_key(key: str) -> bool:
    """Keys the official api.py takes from a LoRA file rather than the base."""
    return key_kind(key) != "trunk"


def count_kinds(sd: dict) -> dict:
    out = {"trunk": 0, "lora": 0, "zero_conv": 0, "norm": 0}
    for k in sd:
        out[key_kind(k)] += 1
    return out


def flat_fp32(sd: dict) -> dict:
    """Independent, contiguous fp32 copies (safe for safetensors/torch.save)."""
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sorted(sd.items())}


def assert_no_zeros(name: str, sd: dict) -> None:
    for k, v in sd.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), f"{name}:{k} not finite"
            assert (v != 0).all(), f"{name}:{k} has exact zeros"


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: key sets differ"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}:{k}"
        assert torch.equal(a[k], b[k]), f"{what}:{k} values differ"


# --------------------------------------------------------------------------
# Building the files
# --------------------------------------------------------------------------

def build_base(off: SimpleNamespace, seed: int) -> dict:
    """Random Base ControlNet as produced by ``tool_extract_weights -t control``
    on a pretraining checkpoint (one task LoRA switched in -> leftover
    ``lora_layer`` tensors in the file)."""
    task = "pretrain_task"
    net = off.pretrain.ControlNetPretrain(lora_rank=LORA_RANK, tasks=[task], **NET_CONFIG)
    randomize_everything_(off, net, torch.Generator().manual_seed(seed))
    net.switch_lora(task)
    ckpt = LDMShell(net).state_dict()
    base = flat_fp32(off.extract_tool.extract_control(ckpt))
    assert not any("loras_dict" in k or "input_hint_block" in k for k in base)
    return base


def build_condition_lora(off: SimpleNamespace, base: dict, seed: int) -> dict:
    """Random condition LoRA as produced by ``tool_extract_weights -t lora`` on
    a fine-tuning checkpoint started from ``base``."""
    net = off.finetune.ControlNetFinetune(ft_with_lora=True, lora_rank=LORA_RANK, **NET_CONFIG)
    shell = LDMShell(net)
    # Initialise from the base like the official fine-tuning script: every
    # control_model key of the base except LoRA ones; strict load.
    scratch = shell.state_dict()
    for k, v in base.items():
        if k.startswith(PREFIX) and k in scratch and "lora" not in k:
            scratch[k] = v.clone()
    shell.load_state_dict(scratch, strict=True)
    before = flat_fp32(shell.state_dict())

    randomize_condition_params_(off, net, torch.Generator().manual_seed(seed))
    after = flat_fp32(shell.state_dict())
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    trainable = {PREFIX + n for n, _ in net.named_parameters() if is_condition_key(n)}
    assert changed == trainable, "randomised set != official fine-tuning trainable set"

    lora = flat_fp32(off.extract_tool.extract_lora(after))
    assert set(lora) == trainable
    return lora


def save_and_verify(off: SimpleNamespace, sd: dict, path: Path, ckpt_path: Path | None = None) -> None:
    save_file(sd, str(path), metadata={"format": "pt"})
    assert_same(sd, load_file(str(path)), f"reload {path.name}")
    # Also through the official reader (cldm.model.load_state_dict).
    assert_same(sd, load_official(off, path), f"official reload {path.name}")
    if ckpt_path is not None:
        torch.save(sd, str(ckpt_path))
        assert_same(sd, torch.load(str(ckpt_path), map_location="cpu", weights_only=True),
                    f"reload {ckpt_path.name}")
        assert_same(sd, load_official(off, ckpt_path), f"official reload {ckpt_path.name}")


def load_official(off: SimpleNamespace, path: Path) -> dict:
    """Read a weight file with the official cldm.model.load_state_dict."""
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the path
        return off.model_io.load_state_dict(str(path), location="cpu")


# --------------------------------------------------------------------------
# Official loading path and forward
# --------------------------------------------------------------------------

def load_inference_like_api(off: SimpleNamespace, base_path: Path, lora_paths: list[Path]) -> LDMShell:
    """Build ControlNetInference(lora_num=len(lora_paths)) and load the files
    the way CtrLoRA.create_model in api.py does."""
    torch.manual_seed(SEEDS["construct"])
    net = off.inference.ControlNetInference(lora_rank=LORA_RANK, lora_num=len(lora_paths), **NET_CONFIG)
    assert_plain_attention(off, net)
    shell = LDMShell(net)

    base = load_official(off, base_path)
    base = {k: v for k, v in base.items() if k.startswith("control_model") and not is_condition_key(k)}
    res = shell.load_state_dict(base, strict=False)
    assert not res.unexpected_keys, res.unexpected_keys
    # Missing: only the switchable copies and the (not yet switched) condition
    # modules' own parameters.
    assert all(is_condition_key(k) or "_list." in k for k in res.missing_keys)

    for i, path in enumerate(lora_paths):
        sd = load_official(off, path)
        sd = {k: v for k, v in sd.items() if is_condition_key(k)}
        net.switch_lora(i)
        res = shell.load_state_dict(sd, strict=False)
        assert not res.unexpected_keys, res.unexpected_keys
        net.copy_weights_to_switchable()
    net.eval()
    return shell


def check_loaded_values(off: SimpleNamespace, shell: LDMShell, base: dict, loras: list[dict]) -> None:
    """After loading, the copy selected by switch_lora(i) holds LoRA file i,
    and everything else holds the base trunk."""
    net = shell.control_model
    for i, lora in enumerate(loras):
        net.switch_lora(i)
        live = shell.state_dict()
        for k, v in lora.items():
            if "lora_layer" in k:
                assert torch.equal(live[k], v), k
            else:
                # Switchable conv/norm: the active copy is the child module.
                child = "conv_layer" if is_zero_conv_name(k) else "norm_layer"
                head, leaf = k.rsplit(".", 1)
                assert torch.equal(live[f"{head}.{child}.{leaf}"], v), k
        for k, v in base.items():
            if not is_condition_key(k):
                assert torch.equal(live[k], v), k


class RecordingUNet:
    """Stands in for the SD UNet: remembers the control list it is given."""

    def __init__(self):
        self.control = None

    def __call__(self, x, timesteps=None, context=None, control=None, only_mid_control=False):
        assert only_mid_control is False
        self.control = [c.detach().clone() for c in control]
        return x


def official_apply_model(off, shell: LDMShell, hints: list, t, context, scales, weights) -> list:
    """Run ControlInferenceLDM.apply_model on a minimal stand-in LDM: the hint
    is already a latent (identity VAE) and the UNet records the controls."""
    unet = RecordingUNet()
    fake_ldm = SimpleNamespace(
        control_model=shell.control_model,
        control_scales=list(scales),
        lora_weights=list(weights),
        only_mid_control=False,
        model=SimpleNamespace(diffusion_model=unet),
        encode_first_stage=lambda x: x,
        get_first_stage_encoding=lambda x: x,
    )
    conds = [{"c_concat": [h], "c_crossattn": [context]} for h in hints]
    x_noisy = torch.zeros(hints[0].shape[0], 4, LATENT_HW, LATENT_HW)
    with torch.no_grad():
        off.inference.ControlInferenceLDM.apply_model(fake_ldm, x_noisy, t, conds if len(conds) > 1 else conds[0])
    return unet.control


def reference_mix(net, hints: list, t, context, scales, weights) -> list:
    """Own re-implementation of the per-condition loop + weighted sum."""
    total = None
    with torch.no_grad():
        for i, (hint, w) in enumerate(zip(hints, weights)):
            net.switch_lora(i)
            outs = net(hint=hint, timesteps=t, context=context)
            outs = [o * s * w for o, s in zip(outs, scales)]
            total = outs if total is None else [a + b for a, b in zip(total, outs)]
    return total


def assert_close(a: list, b: list, what: str, atol=1e-6, rtol=1e-5) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.allclose(x, y, atol=atol, rtol=rtol), f"{what}[{i}] max diff {(x - y).abs().max()}"


def base_only_outputs(off, base_path: Path, hint, t, context) -> list:
    """Plain Base ControlNet (no LoRA, base zero convs and norms): official
    ControlNetPretrain with no task switched in, so lora_layer is None."""
    net = off.pretrain.ControlNetPretrain(lora_rank=LORA_RANK, tasks=["unused"], **NET_CONFIG)
    assert_plain_attention(off, net)
    shell = LDMShell(net)
    base = load_official(off, base_path)
    res = shell.load_state_dict(base, strict=False)
    assert all("lora_layer" in k for k in res.unexpected_keys)
    assert all("loras_dict" in k for k in res.missing_keys)
    assert all(m.lora_layer is None for m in net.modules() if isinstance(m, off.lora.LoRACompatibleLinear))
    net.eval()
    with torch.no_grad():
        outs = net(hint=hint, timesteps=t, context=context)

    # Cross-check: a fresh official fine-tuning model at step 0 (base weights,
    # LoRA up = 0 from its own init) must give the same residuals.
    ft = off.finetune.ControlNetFinetune(ft_with_lora=True, lora_rank=LORA_RANK, **NET_CONFIG)
    ft_shell = LDMShell(ft)
    res = ft_shell.load_state_dict({k: v for k, v in base.items() if "lora" not in k}, strict=False)
    assert res.missing_keys and all("lora_layer" in k for k in res.missing_keys) and not res.unexpected_keys
    ft.eval()
    with torch.no_grad():
        ft_outs = ft(hint=hint, timesteps=t, context=context)
    assert_close(outs, ft_outs, "base_only vs finetune step 0", atol=0, rtol=0)
    return outs


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def make_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hint_a": torch.randn(BATCH, 4, LATENT_HW, LATENT_HW, generator=g),
        "hint_b": torch.randn(BATCH, 4, LATENT_HW, LATENT_HW, generator=g),
        "timesteps": torch.tensor(TIMESTEPS, dtype=torch.int64),
        "context": torch.randn(BATCH, CONTEXT_TOKENS, NET_CONFIG["context_dim"], generator=g),
    }


def stats(outs: list) -> str:
    return " ".join(f"{o.abs().mean():.3g}/{o.abs().max():.3g}" for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctrlora-src", type=Path, required=True,
                    help="extracted source tree of xyfJASON/ctrlora (commit %s)" % OFFICIAL_COMMIT)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    warnings.filterwarnings("ignore", message=".*autocast.*")

    torch.manual_seed(SEEDS["construct"])
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    off = import_official(args.ctrlora_src)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    # ---- weight files --------------------------------------------------
    base = build_base(off, SEEDS["base"])
    lora_a = build_condition_lora(off, base, SEEDS["lora_a"])
    lora_b = build_condition_lora(off, base, SEEDS["lora_b"])
    for name, sd in (("base", base), ("lora_a", lora_a), ("lora_b", lora_b)):
        assert_no_zeros(name, sd)
        assert all(k.startswith(PREFIX) for k in sd)
    assert set(lora_a) == set(lora_b)
    assert set(lora_a) == {k for k in base if is_condition_key(k)}, "LoRA keys != base condition keys"
    assert base[PREFIX + "input_blocks.0.0.weight"].shape == (NET_CONFIG["model_channels"], 4, 3, 3)

    save_and_verify(off, base, out / "base.safetensors")
    save_and_verify(off, lora_a, out / "lora_a.safetensors", out / "lora_a.ckpt")
    save_and_verify(off, lora_b, out / "lora_b.safetensors")

    inputs = make_inputs(SEEDS["inputs"])
    save_file(inputs, str(out / "inputs.safetensors"))
    hint_a, hint_b, t, ctx = inputs["hint_a"], inputs["hint_b"], inputs["timesteps"], inputs["context"]

    # ---- official loading + expected outputs ---------------------------
    one = load_inference_like_api(off, out / "base.safetensors", [out / "lora_a.safetensors"])
    two = load_inference_like_api(off, out / "base.safetensors",
                                  [out / "lora_a.safetensors", out / "lora_b.safetensors"])
    # Loading the .ckpt through the same path must give an identical model.
    one_ckpt = load_inference_like_api(off, out / "base.safetensors", [out / "lora_a.ckpt"])
    assert_same(flat_fp32(one.state_dict()), flat_fp32(one_ckpt.state_dict()), ".ckpt vs .safetensors load")
    check_loaded_values(off, one, base, [lora_a])
    check_loaded_values(off, two, base, [lora_a, lora_b])

    full, half = [1.0] * NUM_OUTPUTS, [HALF_STRENGTH] * NUM_OUTPUTS
    expected = {
        "one_lora": official_apply_model(off, one, [hint_a], t, ctx, full, [1.0]),
        "one_lora_half": official_apply_model(off, one, [hint_a], t, ctx, half, [1.0]),
        "two_loras": official_apply_model(off, two, [hint_a, hint_b], t, ctx, full, TWO_LORA_WEIGHTS),
        "base_only": base_only_outputs(off, out / "base.safetensors", hint_a, t, ctx),
    }

    # ---- cross-checks ---------------------------------------------------
    assert_close(expected["one_lora"], reference_mix(one.control_model, [hint_a], t, ctx, full, [1.0]), "one_lora ref")
    assert_close(expected["one_lora_half"], reference_mix(one.control_model, [hint_a], t, ctx, half, [1.0]), "half ref")
    assert_close(expected["two_loras"],
                 reference_mix(two.control_model, [hint_a, hint_b], t, ctx, full, TWO_LORA_WEIGHTS), "two ref")
    # lora_num=2 model, slot 0 == lora_num=1 model.
    assert_close(expected["one_lora"], reference_mix(two.control_model, [hint_a], t, ctx, full, [1.0]),
                 "slot 0 of 2-LoRA model", atol=0, rtol=0)
    with torch.no_grad():
        two.control_model.switch_lora(1)
        b_on_a = two.control_model(hint=hint_a, timesteps=t, context=ctx)
        # A's zero convs + norms but with the LoRA linears switched off.
        net = one.control_model
        net.switch_lora(0)
        linears = [m for m in net.modules() if isinstance(m, off.lora.LoRACompatibleLinear)]
        for m in linears:
            m.set_lora_layer(None)
        a_no_linear_lora = net(hint=hint_a, timesteps=t, context=ctx)
        net.switch_lora(0)
    for i in range(NUM_OUTPUTS):
        a = expected["one_lora"][i]
        assert torch.isfinite(a).all()
        assert not torch.allclose(a, b_on_a[i], atol=1e-3), f"output {i}: LoRA A vs B identical"
        assert not torch.allclose(a, expected["base_only"][i], atol=1e-3), f"output {i}: LoRA A vs base identical"
        assert not torch.allclose(a, expected["two_loras"][i], atol=1e-3), f"output {i}: one vs two identical"
    linear_effect = [(a - b).abs().max().item() for a, b in zip(expected["one_lora"], a_no_linear_lora)]
    # input block 0 is a plain conv: its residual cannot see LoRA linears.
    assert linear_effect[0] == 0.0 and all(d > 1e-3 for d in linear_effect[1:]), linear_effect

    flat_expected = {f"{name}.{i}": o.contiguous() for name, outs in expected.items() for i, o in enumerate(outs)}
    save_file(flat_expected, str(out / "expected.safetensors"))
    assert_same(flat_expected, load_file(str(out / "expected.safetensors")), "reload expected")

    config = {
        "official_repo": OFFICIAL_REPO,
        "official_commit": OFFICIAL_COMMIT,
        "control_model": NET_CONFIG,
        "lora_rank": LORA_RANK,
        "key_prefix": PREFIX,
        "dtype": "float32",
        "seeds": SEEDS,
        "timesteps": TIMESTEPS,
        "cases": {
            "one_lora": {"loras": ["lora_a"], "hints": ["hint_a"], "lora_weights": [1.0], "strength": 1.0},
            "one_lora_half": {"loras": ["lora_a"], "hints": ["hint_a"], "lora_weights": [1.0],
                              "strength": HALF_STRENGTH},
            "two_loras": {"loras": ["lora_a", "lora_b"], "hints": ["hint_a", "hint_b"],
                          "lora_weights": list(TWO_LORA_WEIGHTS), "strength": 1.0},
            "base_only": {"loras": [], "hints": ["hint_a"], "lora_weights": [], "strength": 1.0},
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    # ---- summary ----------------------------------------------------------
    print(f"official code: {off.src} (stubbed: {', '.join(off.stubbed)})")
    for name, sd in (("base", base), ("lora_a", lora_a), ("lora_b", lora_b)):
        n_params = sum(v.numel() for v in sd.values())
        print(f"{name:7s}: {len(sd)} tensors, {n_params} params, by kind {count_kinds(sd)}")
    print(f"expected: {len(flat_expected)} tensors; inputs: {sorted(inputs)}")
    print("residual |mean|/|max| per output index:")
    for name, outs in expected.items():
        print(f"  {name:14s} {stats(outs)}")
    print("max |one_lora - same without LoRA linears| per index:",
          " ".join(f"{d:.3g}" for d in linear_effect))
    print("files:")
    for p in sorted(out.iterdir()):
        print(f"  {p.name:22s} {p.stat().st_size / 1e6:8.3f} MB")
    print(f"total {sum(p.stat().st_size for p in out.iterdir()) / 1e6:.3f} MB")


if __name__ == "__main__":
    main()
