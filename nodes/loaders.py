"""Nodes that load and combine model files: Load CtrLoRA Base ControlNet, Load CtrLoRA LoRA, Blend CtrLoRA LoRAs.

A wrong file is refused from its header before its tensors are read (`ctrlora_core.formats`),
and an error leaving a node keeps no tensors in its traceback (`release_on_error`): ComfyUI
holds the last error until its next garbage collection.
"""
from __future__ import annotations

from typing import Any

from ..ctrlora_core.adapters import LORA_UP, CtrLoRAAdapter, blend_adapters
from ..ctrlora_core.errors import release_on_error
from ..ctrlora_core.files import file_stamp
from ..ctrlora_core.formats import FileKind, save_adapter

from . import model_files
from .handles import BASE_TYPE, LORA_TYPE, LoRAHandle

CATEGORY = "CtrLoRA"


def _choices(kind: FileKind) -> list[str]:
    try:
        return model_files.list_files(kind)
    except ImportError:  # outside ComfyUI (tests, scripts): no model folders
        return []


def _file_stamp(name: str) -> str:
    """Changes when the picked file changes on disk, so ComfyUI reloads a retrained LoRA."""
    try:
        return str(file_stamp(model_files.resolve(name)))
    except (OSError, ValueError):
        return name


class CtrLoRABaseLoader:
    DESCRIPTION = ("Loads a CtrLoRA Base ControlNet (models/ctrlora, or a CtrLoRA file in models/controlnet). "
                   "All Apply CtrLoRA nodes using it share one copy in memory.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (BASE_TYPE,)
    RETURN_NAMES = ("base",)
    OUTPUT_TOOLTIPS = ("The Base ControlNet, for Apply CtrLoRA.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"base_name": (_choices(FileKind.CTRLORA_BASE), {
            "tooltip": "Base file, e.g. ctrlora_sd15_basecn700k.ckpt"})}}

    @classmethod
    def IS_CHANGED(cls, base_name: str) -> str:
        return _file_stamp(base_name)

    @release_on_error
    def load(self, base_name: str) -> dict:
        from .base_model import load_base_handle  # needs ComfyUI

        handle = load_base_handle(model_files.resolve(base_name))
        return {"ui": {"text": [handle.summary()]}, "result": (handle,)}


class CtrLoRALoRALoader:
    DESCRIPTION = ("Loads a CtrLoRA condition LoRA (LoRA on every Linear plus the condition's zero convs and "
                   "attention norms). Strength scales the low-rank update.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The condition LoRA, for CtrLoRA Condition or Blend CtrLoRA LoRAs.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "lora_name": (_choices(FileKind.CTRLORA_LORA), {"tooltip": "Condition LoRA file"}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.01,
                                   "tooltip": "W + strength * up @ down (zero convs and norms are the LoRA's)"}),
        }}

    @classmethod
    def IS_CHANGED(cls, lora_name: str, strength: float) -> str:
        return _file_stamp(lora_name)

    @release_on_error
    def load(self, lora_name: str, strength: float) -> dict:
        lora = LoRAHandle.from_file(model_files.resolve(lora_name), strength)
        return {"ui": {"text": [lora.summary()]}, "result": (lora,)}


def _with_strength(adapter: CtrLoRAAdapter, strength: float) -> CtrLoRAAdapter:
    """`adapter` with its LoRA up matrices scaled (the loader's strength folded in)."""
    if strength == 1.0:
        return adapter
    tensors = {k: v * strength if k.endswith(LORA_UP) else v for k, v in adapter.tensors.items()}
    return CtrLoRAAdapter(tensors, adapter.name, adapter.metadata)


class CtrLoRABlendLoRAs:
    DESCRIPTION = ("Blends 2-4 condition LoRAs into one for the same condition slot: "
                   "dW = sum w_i up_i down_i, zero convs and norms = sum w_i (...). "
                   "rank 0 keeps it exact; a rank re-factors each layer by SVD. Optionally saves it to models/ctrlora.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    FUNCTION = "blend"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        weight = ("FLOAT", {"default": 0.5, "min": -2.0, "max": 2.0, "step": 0.01})
        return {
            "required": {"lora_1": (LORA_TYPE,), "weight_1": weight, "lora_2": (LORA_TYPE,), "weight_2": weight},
            "optional": {
                "lora_3": (LORA_TYPE,), "weight_3": weight, "lora_4": (LORA_TYPE,), "weight_4": weight,
                "rank": ("INT", {"default": 0, "min": 0, "max": 1024,
                                 "tooltip": "0 = exact (rank = sum of ranks); otherwise SVD to this rank"}),
                "save_name": ("STRING", {"default": "",
                                         "tooltip": "File name in models/ctrlora to save the blend to; empty = don't save"}),
            },
        }

    @release_on_error
    def blend(self, lora_1: LoRAHandle, weight_1: float, lora_2: LoRAHandle, weight_2: float,
              lora_3: LoRAHandle | None = None, weight_3: float = 0.5, lora_4: LoRAHandle | None = None,
              weight_4: float = 0.5, rank: int = 0, save_name: str = "") -> dict:
        pairs = [(lora, w) for lora, w in ((lora_1, weight_1), (lora_2, weight_2), (lora_3, weight_3),
                                            (lora_4, weight_4)) if lora is not None]
        adapters = [_with_strength(lora.load(), lora.strength) for lora, _ in pairs]
        recipe = " + ".join(f"{w:g}*{lora.name}" for lora, w in pairs)
        blended, error = blend_adapters(adapters, [w for _, w in pairs], rank=rank or None, name="blend")
        conditions = sorted({str(lora.info["condition"]) for lora, _ in pairs if lora.info.get("condition")})
        metadata: dict[str, Any] = {"blend_of": recipe}
        if conditions:
            metadata["condition"] = "+".join(conditions)
        lines = [f"blend: {recipe}, rank {blended.rank}" + (f", SVD error {error:.2%}" if rank else "")]
        blended.metadata.update(metadata)
        if save_name.strip():
            path = model_files.output_path(save_name)
            save_adapter(blended, path)
            lines.append(f"saved to {path}")
        lora = LoRAHandle.in_memory(blended, {"rank": blended.rank, **metadata})
        return {"ui": {"text": lines}, "result": (lora,)}
