"""The trainer on a full-size SD1.5 loaded through a real ComfyUI (random weights). Needs $COMFYUI_PATH.

The checkpoint is built with ComfyUI's own classes (SD15 UNet, SD1 CLIP, KL autoencoder), every
tensor filled with randn * 0.02, saved with the official prefixes and cached in
~/.cache/comfyui-ctrlora-tests (about 2 GB fp16). A full-size random CtrLoRA base is cached beside it.
Peak memory of the test is about 8 GB.
"""
import os
from pathlib import Path

import pytest
import torch

from ctrlora_core.config import ControlNetConfig
from ctrlora_core.formats import FileKind, load_adapter, load_base, scan_file
from ctrlora_core.random_weights import random_base, save_random_base
from train_data import write_dental

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set: ComfyUI-backed trainer test skipped")
CACHE = Path.home() / ".cache" / "comfyui-ctrlora-tests"

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _fill_(module: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)


def random_sd15_checkpoint() -> Path:
    """Random full-size SD1.5 single-file checkpoint built from ComfyUI's classes (cached)."""
    path = CACHE / "random_sd15_fp16.safetensors"
    if path.is_file():
        return path
    from safetensors.torch import save_file

    from train.backbones.comfy import find_comfyui, import_comfy

    import_comfy(find_comfyui(COMFYUI_PATH), torch.device("cpu"))
    import comfy.model_detection
    from comfy.ldm.models.autoencoder import AutoencoderKL

    generator = torch.Generator().manual_seed(0)
    config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET))
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({})
    clip = config.clip_target().clip(dtype=torch.float16)
    vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4).half()
    for part in (model, clip, vae):
        _fill_(part, generator)
    tensors = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    return path


def random_sd15_base() -> Path:
    path = CACHE / "random_ctrlora_base_sd15.safetensors"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        save_random_base(path, random_base(ControlNetConfig(), seed=0))
    return path


def test_training_on_comfyui_loaded_sd15(tmp_path):
    torch.set_num_threads(2)
    checkpoint, base_path = random_sd15_checkpoint(), random_sd15_base()
    data = write_dental(tmp_path / "teeth", count=3)
    from train import train_lora

    summary = train_lora.main([
        "--data", str(data), "--model", str(checkpoint), "--base", str(base_path), "--comfyui", COMFYUI_PATH,
        "--out", str(tmp_path / "run"), "--rank", "4", "--lr", "1e-3", "--steps", "2", "--log-every", "1",
        "--val-count", "1", "--val-every", "2", "--val-steps", "1", "--device", "cpu"])
    lora = scan_file(summary["lora"])
    metadata = lora.metadata
    assert lora.kind == FileKind.CTRLORA_LORA and len(lora.shapes) == 246  # the official SD1.5 layout
    assert metadata["training_steps"] == "2" and metadata["sd_model"] == checkpoint.name
    adapter = load_adapter(summary["lora"], load_base(base_path))
    ups = [t for k, t in adapter.tensors.items() if k.endswith("lora_layer.up.weight")]
    # gradients reached the LoRA through ComfyUI's UNet
    assert sum(float(u.abs().max()) > 0 for u in ups) > len(ups) // 2
    assert (tmp_path / "run" / "val" / "step_000002.png").is_file()
