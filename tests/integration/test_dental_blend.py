"""The trainer's maps-layout condition equals, byte for byte, what a workflow builds from the same
files: ComfyUI's own Load Image node -> Blend Lighting + Segmentation (with and without masks)."""
from __future__ import annotations

import numpy as np
import pytest

from train_data import write_maps
from train.dataset import MapBlend, check_dataset, load_condition


@pytest.fixture(scope="module")
def load_image(comfy_lib):
    import nodes as comfy_nodes  # ComfyUI's nodes.py (the pack's own is ComfyUI_CtrLoRA.nodes)

    return comfy_nodes.LoadImage().load_image


@pytest.mark.parametrize("rgba", [False, True])
def test_trainer_condition_is_the_workflows_condition(load_image, tmp_path, rgba):
    from ComfyUI_CtrLoRA.nodes.dental import CtrLoRABlendLightingSeg

    root = write_maps(tmp_path / "maps", count=3, rgba=rgba)
    for alpha, mode in ((0.3, "alpha"), (0.6, "soft_light")):
        pairs, _ = check_dataset(root, blend=MapBlend.parse("lighting,segmentation", alpha, mode))
        for pair in pairs:
            (lighting, lighting_mask), (seg, seg_mask) = (load_image(str(path)) for path in pair.maps)
            (image,) = CtrLoRABlendLightingSeg().blend(lighting, seg, alpha, mode, lighting_mask, seg_mask)
            trainer = load_condition(pair)
            assert image.shape == (1, *trainer.shape) and image.numpy().dtype == trainer.dtype
            assert image[0].numpy().tobytes() == trainer.tobytes()
