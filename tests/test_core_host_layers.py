"""Host layers that manage their own weights: the library must not assume plain torch.nn behaviour.

Two behaviours of ComfyUI's layer classes, reproduced in plain torch (the ComfyUI versions are in
tests/integration/test_newer_hosts.py): Linear layers that create their weights only when a state
dict is loaded (dynamic VRAM), and weights that get patched when the layer casts them for a forward.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ctrlora_core.adapters import stack_adapters
from ctrlora_core.controlnet import CtrLoRAControlNet
from ctrlora_core.formats import load_base
from ctrlora_core.random_weights import SMALL_CONFIG, random_adapter, random_base, save_random_base

SHIFT = 0.02


class LazyLinear(nn.Linear):
    """No weight or bias until loaded; loading adopts the given tensors as they are."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = self.bias = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for key, value in state_dict.items():
            name = key[len(prefix):]
            if name in ("weight", "bias"):
                setattr(self, name, nn.Parameter(value, requires_grad=False))
            else:
                unexpected_keys.append(key)


class ShiftOnCastLinear(nn.Linear):
    """Adds SHIFT to its weight whenever it uses it, as a host applying a weight patch per cast."""

    def forward(self, x):
        return F.linear(x, self.weight + SHIFT, self.bias)


@contextlib.contextmanager
def shifted_cast_weights(layer, dtype, device):
    """The matching `cast_weights` hook of the host namespace."""
    yield layer.weight.to(device, dtype) + SHIFT, None if layer.bias is None else layer.bias.to(device, dtype)


def host(linear, **extra):
    return type("HostOps", (), dict(Linear=linear, Conv2d=nn.Conv2d, GroupNorm=nn.GroupNorm,
                                    LayerNorm=nn.LayerNorm, **extra))


def test_base_loads_into_linear_layers_that_make_their_weights_when_loaded(tmp_path):
    reference = random_base(SMALL_CONFIG, seed=0)
    save_random_base(tmp_path / "base.safetensors", reference)
    with torch.device("meta"):
        bare = CtrLoRAControlNet(SMALL_CONFIG, host(LazyLinear))
    assert not any(k.endswith("to_q.weight") for k in bare.state_dict())  # no Linear keys before loading
    model = load_base(tmp_path / "base.safetensors", host_ops=host(LazyLinear), dtype=torch.float64)
    expected = reference.state_dict()
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float64 and torch.equal(value, expected[key].double()), key
    assert expected.keys() == model.state_dict().keys()


def test_merged_inference_path_takes_weights_from_the_hosts_cast():
    """Without autograd, wide layers with many tokens build merged weights from `cast_weights`."""
    reference = random_base(SMALL_CONFIG, seed=0)
    model = CtrLoRAControlNet(SMALL_CONFIG, host(ShiftOnCastLinear, cast_weights=shifted_cast_weights))
    model.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.Linear):
                m.weight += SHIFT
    stack = stack_adapters([random_adapter(reference, 4, 1, "a"), random_adapter(reference, 4, 2, "b")], [0.6, 0.4])
    g = torch.Generator().manual_seed(5)
    hint, t, ctx = torch.randn(4, 4, 16, 16, generator=g), torch.tensor([999, 17]), torch.randn(2, 6, 32, generator=g)
    with torch.no_grad():
        got = model(hint, t, ctx, adapters=stack)
        expected = reference(hint, t, ctx, adapters=stack)
    for a, b in zip(got, expected):  # float32 rounding of the same sums in another order
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
