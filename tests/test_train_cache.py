"""Latent/text caches: built once, reused while nothing changes, rebuilt when a file, the model or the size changes."""
import copy
import os

import pytest
import torch

from float_reference import assert_float32_close
from train_data import one_thread, write_dental  # noqa: F401
from train.backbones.backbone import sample_latent
from train.backbones.tiny import TinyBackbone
from train.dataset import check_dataset, load_pair
from train.latent_cache import cached_latents, cached_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingBackbone:
    """A TinyBackbone that counts the images and prompts it encodes."""

    def __init__(self, seed=0):
        self.inner = TinyBackbone.random(seed)
        self.images = 0
        self.prompts = []

    def encode_moments(self, images):
        self.images += images.shape[0]
        return self.inner.encode_moments(images)

    def encode_text(self, prompts):
        self.prompts += list(prompts)
        return self.inner.encode_text(prompts)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = write_dental(tmp_path_factory.mktemp("cache") / "data", count=4)
    return root


def test_latents_are_built_once_then_reused(dataset, tmp_path):
    pairs, _ = check_dataset(dataset)
    backbone = CountingBackbone()
    first, built = cached_latents(backbone, pairs, (64, 64), tmp_path, "model-a", show_progress=False)
    assert built and backbone.images == 2 * len(pairs)
    again, built = cached_latents(backbone, pairs, (64, 64), tmp_path, "model-a", show_progress=False)
    assert not built and backbone.images == 2 * len(pairs)
    assert torch.equal(first.cond_moments, again.cond_moments)
    assert torch.equal(first.target_moments, again.target_moments)
    # the cached values are the VAE moments: condition in [0, 1], target in [-1, 1] (encoded in other
    # batches: equal up to float32 rounding, measured on a float64 copy of the autoencoder)
    images = torch.stack(load_pair(pairs[2]))
    expected = backbone.inner.encode_moments(images)
    expected64 = copy.deepcopy(backbone.inner.autoencoder).double().encode_moments(images.double())
    assert_float32_close([again.cond_moments[2], again.target_moments[2]], expected, expected64)
    assert again.cond_moments.shape == (4, 8, 8, 8)


@pytest.mark.parametrize("change", ["touch_file", "model", "resolution", "pair_list"])
def test_latent_cache_is_invalidated(dataset, tmp_path, change):
    pairs, _ = check_dataset(dataset)
    backbone = CountingBackbone()
    cached_latents(backbone, pairs, (64, 64), tmp_path, "model-a", show_progress=False)
    identity, resolution = "model-a", (64, 64)
    if change == "touch_file":
        path = pairs[1].target
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "model":
        identity = "model-b"
    elif change == "resolution":
        resolution = (72, 72)
    else:
        pairs = pairs[:3]
    before = backbone.images
    _, built = cached_latents(backbone, pairs, resolution, tmp_path, identity, show_progress=False)
    assert built and backbone.images == before + 2 * len(pairs)


def test_cache_file_with_a_foreign_key_is_not_trusted(dataset, tmp_path):
    pairs, _ = check_dataset(dataset)
    backbone = CountingBackbone()
    cached_latents(backbone, pairs, (64, 64), tmp_path, "model-a", show_progress=False)
    (cache_file,) = tmp_path.glob("latents-*.safetensors")
    from safetensors.torch import load_file, save_file

    save_file(load_file(cache_file), cache_file, metadata={"key": "something else"})
    _, built = cached_latents(backbone, pairs, (64, 64), tmp_path, "model-a", show_progress=False)
    assert built


def test_builder_only_mode_refuses_to_encode(dataset, tmp_path):
    pairs, _ = check_dataset(dataset)
    with pytest.raises(FileNotFoundError, match="latent cache missing"):
        cached_latents(CountingBackbone(), pairs, (64, 64), tmp_path, "model-a", build=False)


def test_prompts_encoded_once_each_with_empty_first(tmp_path):
    backbone = CountingBackbone()
    prompts = ["b prompt", "a prompt", "b prompt", "a prompt", "b prompt"]
    table, built = cached_prompts(backbone, prompts, tmp_path, "model-a")
    assert built and sorted(backbone.prompts) == ["", "a prompt", "b prompt"]
    assert table.prompts[0] == "" and table.index("b prompt") == 2
    encoder64 = copy.deepcopy(backbone.inner.text_encoder).double()
    assert_float32_close([table.embeddings[table.index("a prompt")]], backbone.inner.encode_text(["a prompt"]),
                         encoder64.encode(["a prompt"]))
    _, built = cached_prompts(backbone, prompts, tmp_path, "model-a")
    assert not built and len(backbone.prompts) == 3
    _, built = cached_prompts(backbone, prompts + ["new"], tmp_path, "model-a")
    assert built


def test_posterior_samples_from_cached_moments_follow_the_moments():
    mean = torch.full((1, 4, 16, 16), 0.5)
    logvar = torch.full((1, 4, 16, 16), -2.0)
    samples = torch.cat([sample_latent(torch.cat([mean, logvar], 1), 0.18215, torch.Generator().manual_seed(i))
                         for i in range(50)])
    assert abs(float(samples.mean()) - 0.5 * 0.18215) < 0.002
    assert abs(float(samples.std()) - (torch.exp(torch.tensor(-1.0)) * 0.18215).item()) < 0.002
