"""The miniature models of the demo and their Backbone (train/backbones/tiny_models.py, tiny.py)."""
import os

import pytest
import torch

from ctrlora_core.formats import load_base
from train_data import one_thread  # noqa: F401
from train.backbones.tiny import TinyBackbone
from demo.pretrain_demo import controlnet_from_unet
from train.backbones.tiny_models import TINY_CONFIG, TinyAutoencoder, TinyTextEncoder, TinyUNet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone():
    return TinyBackbone.random(0)


def _inputs(backbone, size=64, batch=2):
    g = torch.Generator().manual_seed(3)
    images = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    latents = backbone.encode_moments(images)[:, :4]
    context = backbone.encode_text(["upper front view", "lower left"][:batch])
    return latents, torch.tensor([10, 800][:batch]), context


def test_residual_i_is_added_to_the_skip_of_input_block_i(backbone):
    x, t, context = _inputs(backbone)
    control = backbone.controlnet(x, t, context)
    unet = backbone.unet
    skips, decoder_inputs = {}, {}
    hooks = [block.register_forward_hook(lambda m, i, o, k=k: skips.__setitem__(k, o))
             for k, block in enumerate(unet.input_blocks)]
    hooks += [block[0].register_forward_pre_hook(lambda m, i, k=k: decoder_inputs.__setitem__(k, i[0]))
              for k, block in enumerate(unet.output_blocks)]
    with torch.no_grad():
        unet(x, t, context, control)
    for hook in hooks:
        hook.remove()
    n = len(unet.input_blocks)
    assert len(control) == n + 1 == 13
    for i in range(n):
        channels = skips[i].shape[1]
        torch.testing.assert_close(decoder_inputs[n - 1 - i][:, -channels:], skips[i] + control[i])


def test_middle_residual_and_zero_control(backbone):
    x, t, context = _inputs(backbone)
    control = backbone.controlnet(x, t, context)
    with torch.no_grad():
        plain = backbone.unet(x, t, context)
        zeros = backbone.unet(x, t, context, [torch.zeros_like(c) for c in control])
        only_middle = backbone.unet(x, t, context, [torch.zeros_like(c) for c in control[:-1]] + [control[-1]])
    assert torch.equal(plain, zeros)
    assert not torch.allclose(plain, only_middle)
    with pytest.raises(ValueError, match="13 control residuals"):
        backbone.unet(x, t, context, control[:-1])


@pytest.mark.parametrize("size", [40, 72])
def test_any_multiple_of_8_works_and_gradients_reach_every_residual(backbone, size):
    x, t, context = _inputs(backbone, size=size, batch=1)
    control = [c.detach().requires_grad_() for c in backbone.controlnet(x, t, context)]
    backbone.set_gradient_checkpointing(True)
    try:
        eps = backbone.predict_noise(x, t, context, control)
        eps.pow(2).mean().backward()
    finally:
        backbone.set_gradient_checkpointing(False)
    assert eps.shape == x.shape == (1, 4, size // 8, size // 8)
    assert all(c.grad is not None and float(c.grad.abs().max()) > 0 for c in control)


def test_controlnet_from_unet_copies_the_encoder_and_zeroes_the_zero_convs():
    unet = TinyUNet()
    model = controlnet_from_unet(unet)
    unet_sd = unet.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith(("zero_convs.", "middle_block_out.")):
            assert not value.any()
        else:
            assert torch.equal(value, unet_sd[key])
    outs = model(torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 7, TINY_CONFIG.context_dim))
    assert all(not o.any() for o in outs)


def test_autoencoder_shapes_and_size_check():
    autoencoder = TinyAutoencoder()
    moments = autoencoder.encode_moments(torch.rand(2, 3, 48, 64))
    assert moments.shape == (2, 8, 6, 8)
    assert autoencoder.decode(moments[:, :4]).shape == (2, 3, 48, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        autoencoder.encode_moments(torch.rand(1, 3, 60, 64))


def test_text_encoder_tokens():
    text = TinyTextEncoder(max_length=8)
    tokens = text.tokenize(["Upper FRONT, view", "upper front , view", "", "a b c d e f g h i j"])
    assert tokens.shape == (4, 8)
    assert torch.equal(tokens[0], tokens[1])
    assert tokens[2].tolist() == [text.BOS, text.EOS] + [text.PAD] * 6
    assert tokens[3, 0] == text.BOS and tokens[3, -1] == text.EOS  # truncated, still closed
    embeddings = text.encode(["upper front", "lower front"])
    assert embeddings.shape == (2, 8, 64) and not torch.allclose(embeddings[0], embeddings[1])


def test_save_and_load_round_trip(backbone, tmp_path):
    backbone.save(tmp_path / "w")
    assert sorted(os.listdir(tmp_path / "w")) == ["autoencoder.safetensors", "base.safetensors",
                                                  "text_encoder.safetensors", "tiny_config.json",
                                                  "unet.safetensors"]
    loaded = TinyBackbone.load(tmp_path / "w")
    x, t, context = _inputs(backbone)
    with torch.no_grad():
        a = backbone.predict_noise(x, t, context, backbone.controlnet(x, t, context))
        b = loaded.predict_noise(x, t, loaded.encode_text(["upper front view", "lower left"]),
                                 loaded.controlnet(x, t, context))
    assert torch.equal(a, b)
    black = torch.zeros(1, 3, 64, 64)
    assert torch.equal(loaded.encode_moments(black), backbone.encode_moments(black))
    assert load_base(tmp_path / "w" / "base.safetensors").config == TINY_CONFIG
    identity = loaded.identity
    backbone.save(tmp_path / "w")  # rewritten files: a new identity, so caches are rebuilt
    assert TinyBackbone.load(tmp_path / "w").identity != identity
    with pytest.raises(FileNotFoundError, match="tiny_config.json"):
        TinyBackbone.load(tmp_path)


def test_random_is_deterministic():
    a, b = TinyBackbone.random(5), TinyBackbone.random(5)
    for (key, p), q in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(p, q), key
    assert a.identity == b.identity != TinyBackbone.random(6).identity
