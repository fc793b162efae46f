"""The `Backbone` over a real SD1.5-family checkpoint, loaded with ComfyUI as the library.

ComfyUI reads the single-file checkpoint (`comfy.sd.load_checkpoint_guess_config`: UNet,
VAE and CLIP, any of the layouts and dtypes it knows); the CtrLoRA base comes from
`ctrlora_core.formats.load_base`. Which ComfyUI: `--comfyui PATH`, else `$COMFYUI_PATH`, else
the ComfyUI whose `custom_nodes/` holds this pack. Run the trainer with ComfyUI's Python.

- UNet: called directly (`diffusion_model(x_t, t, context, control=...)`, LDM convention:
  integer timesteps, x_t not rescaled) with the 13 residuals as ComfyUI's `control` dict
  (12 'output' tensors + 1 'middle', spec comfyui.md §1). ComfyUI adds them in place to
  tensors that carry no autograd history (the UNet is frozen and x_t needs no gradient), so
  gradients reach the residuals and only the decoder half of the UNet keeps activations.
- VAE: `encode_moments` runs ComfyUI's encoder + quant_conv (the posterior moments, before
  ComfyUI picks the mode) on images in the caller's range; `decode` uses ComfyUI's decode.
- CLIP: ComfyUI's tokenizer and text encoder; the first 77 tokens, as the official code.
- Both files are checked from their headers before ComfyUI is imported or reads anything:
  a wrong --base or --model costs a header, not gigabytes.
- Attention: ComfyUI is told to use PyTorch SDPA (`use_pytorch_cross_attention`) when it is
  imported here first.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from ctrlora_core.errors import CtrLoRAError
from ctrlora_core.files import file_stamp
from ctrlora_core.formats import PICKLE_EXTENSIONS, SAFETENSORS_EXTENSIONS, FileKind, load_base, require_kind, scan_file

CLIP_TOKENS = 77
# Kinds a header shows that ComfyUI could never load as an SD checkpoint.
NOT_CHECKPOINTS = (FileKind.CTRLORA_BASE, FileKind.CTRLORA_LORA, FileKind.CONTROLNET, FileKind.SD_LORA)


def find_comfyui(explicit: str | None = None) -> Path:
    """The ComfyUI folder: `explicit`, $COMFYUI_PATH, or the one this pack is installed in."""
    candidates = []
    if explicit:
        candidates.append(("--comfyui", Path(explicit)))
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(("$COMFYUI_PATH", Path(os.environ["COMFYUI_PATH"])))
    pack = Path(__file__).absolute().parents[2]
    if pack.parent.name == "custom_nodes":
        candidates.append(("the pack's location", pack.parent.parent))
    for source, path in candidates:
        if (path / "comfy" / "sd.py").is_file():
            return path.resolve()
        if source != "the pack's location":
            raise CtrLoRAError(f"{source} = {path} is not a ComfyUI folder (no comfy/sd.py inside)")
    raise CtrLoRAError(
        "ComfyUI not found: the trainer loads SD checkpoints through ComfyUI. Pass --comfyui PATH, set "
        "COMFYUI_PATH, or install this pack in ComfyUI/custom_nodes/ (and run with ComfyUI's Python)")


def check_checkpoint_header(path: str) -> None:
    """Refuse --model from its header when it is a kind of file that is not an SD checkpoint.

    Other extensions and unknown layouts are left to ComfyUI's own detection.
    """
    if not os.path.isfile(path):
        raise CtrLoRAError(f"{path}: SD checkpoint does not exist")
    if os.path.splitext(path)[1].lower() not in SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS:
        return
    kind = scan_file(path).kind
    if kind in NOT_CHECKPOINTS:
        raise CtrLoRAError(f"{path}: this is a {kind.value} file, but --model expects an SD1.5-family checkpoint "
                           "(UNet, VAE and text encoder in one file)")


def import_comfy(folder: Path, device: torch.device):
    """Import comfy.sd from `folder`, with SDPA attention and the device chosen before ComfyUI reads its args."""
    if "comfy.model_management" not in sys.modules:
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
        import comfy.cli_args

        comfy.cli_args.args.use_pytorch_cross_attention = True
        comfy.cli_args.args.cpu = device.type == "cpu"
    import comfy.model_management
    import comfy.sd

    return comfy


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run


class ComfyBackbone:
    """Frozen SD1.5 (via ComfyUI) + frozen CtrLoRA Base ControlNet on one device.

    checkpoint: SD1.5-family single-file checkpoint; base: CtrLoRA base file;
    comfyui: ComfyUI folder (see find_comfyui); dtype: dtype of the frozen UNet and base weights.
    """

    def __init__(self, checkpoint_path: str, base: str, comfyui: str | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        check_checkpoint_header(checkpoint_path)
        require_kind(base, FileKind.CTRLORA_BASE)
        comfy = import_comfy(find_comfyui(comfyui), self.device)
        patcher, self.clip, self.vae, _ = comfy.sd.load_checkpoint_guess_config(
            checkpoint_path, output_vae=True, output_clip=True, model_options={"dtype": dtype})
        model = patcher.model
        if model.model_type.name != "EPS":
            raise CtrLoRAError(f"{checkpoint_path}: a {model.model_type.name}-prediction model; CtrLoRA "
                               "needs an SD1.5-family epsilon-prediction checkpoint")
        self.model_management = comfy.model_management
        self.unet = model.diffusion_model.to(self.device, dtype).eval().requires_grad_(False)
        self.latent_scale = float(model.latent_format.scale_factor)
        self.controlnet = load_base(base, dtype=dtype, device=self.device)
        context_dim = model.model_config.unet_config.get("context_dim")
        if context_dim != self.controlnet.config.context_dim:
            raise CtrLoRAError(f"{base}: the base expects text width {self.controlnet.config.context_dim}, the "
                               f"checkpoint {checkpoint_path} gives {context_dim} (not an SD1.5-family pair)")
        self.identity = f"comfy:{file_stamp(checkpoint_path)}"

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the UNet decoder's ResBlocks and transformers in backward (the encoder keeps no activations)."""
        for block in self.unet.output_blocks:
            for layer in block:
                if enabled and "forward" not in vars(layer):
                    layer.forward = _checkpointed(layer.forward)
                elif not enabled and "forward" in vars(layer):
                    del layer.forward

    def compile_unet(self) -> None:
        """torch.compile the UNet (the largest network; the ControlNet with per-step adapters stays eager)."""
        self.unet = torch.compile(self.unet)

    def release_encoders(self) -> None:
        """Let ComfyUI unload the VAE and CLIP from the GPU (the training loop only needs UNet and base)."""
        self.model_management.unload_all_models()
        self.model_management.soft_empty_cache()

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        self.model_management.load_models_gpu([self.vae.patcher])
        autoencoder = self.vae.first_stage_model
        x = images.to(self.vae.device, self.vae.vae_dtype)
        return autoencoder.quant_conv(autoencoder.encoder(x)).float()

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        rows = [self.clip.encode_from_tokens(self.clip.tokenize(p))[:, :CLIP_TOKENS] for p in prompts]
        return torch.cat(rows).float()

    def predict_noise(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                      control: list[torch.Tensor] | None) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        comfy_control = None
        if control is not None:  # fresh lists: ComfyUI consumes them with pop()
            comfy_control = {"output": list(control[:-1]), "middle": [control[-1]]}
        eps = self.unet(x_t.to(dtype), timesteps, context.to(dtype), control=comfy_control, transformer_options={})
        return eps.to(x_t.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents.float() / self.latent_scale)  # BHWC in [0, 1]
        return (images.movedim(-1, 1) * 2.0 - 1.0).to(latents.device)
