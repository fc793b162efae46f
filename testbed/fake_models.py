"""Random-weight, full-size model files for the ComfyUI tests, the benches and the tools.

No real weights can be downloaded where this project is tested, so the files are built
from the real architectures with random values, in the layouts real files have:

- `v1-5-pruned-emaonly-fp16.safetensors`: SD1.5 single-file checkpoint (UNet, CLIP-L text
  model, KL VAE; fp16), key shapes taken from ComfyUI's own classes built on the meta
  device, so ComfyUI detects it as SD1.5;
- `control_sd15_random_fp16.safetensors`: a classic SD1.5 ControlNet (with hint block);
- `ctrlora_sd15_basecn700k.ckpt`: CtrLoRA base, official pickle layout (control_model. prefix,
  leftover pretraining LoRA tensors);
- condition LoRAs at the official rank 128: `ctrlora_sd15_dental_lighting_seg.safetensors`
  (our format, with metadata), `ctrlora_sd15_basecn700k_depth.ckpt` and
  `ctrlora_sd15_basecn700k_seg.ckpt` (official pickles);
- `ctrlora_small_mismatched.safetensors`: a LoRA for a smaller base (a mismatch on purpose).

Values: weights N(0, 1/fan_in), norm scales 1, biases 0 (activations stay O(1), so
every model visibly changes the output). Files are cached in
~/.cache/comfyui-ctrlora-tests/<VERSION>/ (or $CTRLORA_TEST_CACHE/<VERSION>) and
rebuilt when VERSION changes. Building needs ComfyUI's classes:

    COMFYUI_PATH=... <ComfyUI's python> -m testbed.fake_models [--cache DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from ctrlora_core.config import ControlNetConfig
from ctrlora_core.files import atomic_write
from ctrlora_core.formats import CONTROL_PREFIX, save_adapter
from ctrlora_core.random_weights import SMALL_CONFIG, random_adapter, random_base, save_random_base

from .comfy_host import import_comfy

VERSION = "1"

CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
CONTROLNET = "control_sd15_random_fp16.safetensors"
BASE = "ctrlora_sd15_basecn700k.ckpt"
DENTAL_LORA = "ctrlora_sd15_dental_lighting_seg.safetensors"
DEPTH_LORA = "ctrlora_sd15_basecn700k_depth.ckpt"
SEG_LORA = "ctrlora_sd15_basecn700k_seg.ckpt"
MISMATCHED_LORA = "ctrlora_small_mismatched.safetensors"
ALL_FILES = (CHECKPOINT, CONTROLNET, BASE, DENTAL_LORA, DEPTH_LORA, SEG_LORA, MISMATCHED_LORA)
LORA_RANK = 128

# SD1.5 UNet (LDM v1-inference.yaml) in the keyword form of ComfyUI's UNetModel.
SD15_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=768, num_heads=8,
    use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, use_checkpoint=False)
SD_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def cache_dir(root: str | None = None) -> str:
    """The versioned cache folder."""
    root = root or os.environ.get("CTRLORA_TEST_CACHE") or os.path.expanduser("~/.cache/comfyui-ctrlora-tests")
    return os.path.join(root, VERSION)


def missing_files(folder: str) -> list[str]:
    return [name for name in ALL_FILES if not os.path.isfile(os.path.join(folder, name))]


def _random_like(name: str, shape: tuple[int, ...], generator, dtype):
    import torch

    if len(shape) >= 2:
        return (torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))).to(dtype)
    if name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _random_state(modules: dict[str, "object"], seed: int, dtype) -> dict:
    """prefix -> meta-device module  ==>  prefixed random tensors for every parameter."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            out[prefix + key] = _random_like(key, tuple(value.shape), generator, dtype)
    return out


def build_checkpoint(path: str, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**SD15_UNET, device="meta", operations=comfy.ops.disable_weight_init)
        vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
        clip = comfy.sd1_clip.SDClipModel(device="meta")
    text_model = clip.transformer.text_model
    tensors = _random_state({"model.diffusion_model.": unet, "first_stage_model.": vae,
                             "cond_stage_model.transformer.text_model.": text_model}, seed, torch.float16)
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def build_controlnet(path: str, seed: int = 1) -> None:
    import torch
    from safetensors.torch import save_file

    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in SD15_UNET.items() if k not in ("out_channels",)}
    with torch.device("meta"):
        model = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, device="meta",
                                           operations=comfy.ops.disable_weight_init)
    tensors = _random_state({"": model}, seed, torch.float16)
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def build_ctrlora_files(folder: str, seed: int = 2) -> None:
    """Base + LoRAs (rank 128) in the official layouts, plus a LoRA for a smaller base."""
    import torch
    from safetensors.torch import load_file

    base = random_base(ControlNetConfig(), seed)
    staging = os.path.join(folder, ".base-staging.safetensors")
    save_random_base(staging, base)
    atomic_write(os.path.join(folder, BASE), lambda tmp: torch.save(load_file(staging), tmp))
    os.remove(staging)
    save_adapter(random_adapter(base, LORA_RANK, seed + 1, "dental"), os.path.join(folder, DENTAL_LORA),
                 {"condition": "lighting_seg", "prompt_template": "a 3D dental model of {jaw} teeth, {view} view",
                  "training_steps": 1000, "resolution": 512})
    for name, offset in ((DEPTH_LORA, 2), (SEG_LORA, 3)):
        adapter = random_adapter(base, LORA_RANK, seed + offset, name)
        tensors = {CONTROL_PREFIX + k: v for k, v in adapter.tensors.items()}
        atomic_write(os.path.join(folder, name), lambda tmp: torch.save(tensors, tmp))
    small = random_base(SMALL_CONFIG, seed)
    save_adapter(random_adapter(small, 4, seed, "small"), os.path.join(folder, MISMATCHED_LORA))


def ensure_files(folder: str) -> None:
    """Build what is missing in `folder` (this process must be able to import comfy)."""
    os.makedirs(folder, exist_ok=True)
    missing = set(missing_files(folder))
    if CHECKPOINT in missing:
        build_checkpoint(os.path.join(folder, CHECKPOINT))
    if CONTROLNET in missing:
        build_controlnet(os.path.join(folder, CONTROLNET))
    if missing & {BASE, DENTAL_LORA, DEPTH_LORA, SEG_LORA, MISMATCHED_LORA}:
        build_ctrlora_files(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="cache root (default ~/.cache/comfyui-ctrlora-tests)")
    args = parser.parse_args()
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    import_comfy(comfy_path)
    folder = cache_dir(args.cache)
    ensure_files(folder)
    print(folder)


if __name__ == "__main__":
    main()
