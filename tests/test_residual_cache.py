"""The residual cache and the distinct-row grouping of Apply CtrLoRA's control (no ComfyUI needed)."""
from __future__ import annotations

import gc

import pytest
import torch

from ComfyUI_CtrLoRA.nodes.residual_cache import (BUDGET_ENV, DEFAULT_BUDGET_MB, ResidualCache, budget_from_env,
                                                  distinct_rows, tensor_digest)


def entry(values: int, fill: float = 0.0) -> list[torch.Tensor]:
    """A cache entry of `values` float32 numbers (4 bytes each) in two tensors."""
    return [torch.full((values // 2,), float(fill)), torch.full((values - values // 2,), float(fill))]


class Owner:
    """Stands in for a base handle or a VAE (any object that can be weakly referenced)."""


def test_lru_keeps_the_total_within_the_budget_and_evicts_the_least_recent():
    cache = ResidualCache(budget_bytes=3 * 400)
    token = cache.owner_token(Owner())
    for i in range(3):
        cache.put(((token,), i), entry(100, i))
    assert len(cache) == 3 and cache.nbytes == 1200
    assert cache.get(((token,), 0))[0][0] == 0  # 0 is now the most recent
    cache.put(((token,), 3), entry(100, 3))
    assert cache.nbytes <= cache.budget_bytes and len(cache) == 3
    assert cache.get(((token,), 1)) is None  # the least recent went
    assert cache.get(((token,), 0)) is not None and cache.get(((token,), 3)) is not None
    cache.put(((token,), 4), entry(2 * 100, 4))  # needs two entries' room
    assert cache.nbytes == 1200 and cache.get(((token,), 2)) is None and cache.get(((token,), 0)) is None
    assert (cache.hits, cache.misses) == (3, 3)


def test_an_entry_larger_than_the_budget_is_not_stored_and_replacing_a_key_recounts():
    cache = ResidualCache(budget_bytes=400)
    cache.put(((), "a"), entry(50))
    cache.put(((), "big"), entry(101))  # stored, it would evict everything and then itself
    assert len(cache) == 1 and cache.nbytes == 200 and cache.get(((), "a")) is not None
    cache.put(((), "a"), entry(100))
    assert len(cache) == 1 and cache.nbytes == 400


def test_entries_of_an_owner_go_when_it_is_garbage_collected():
    cache = ResidualCache(budget_bytes=10**6)
    base, vae = Owner(), Owner()
    base_token, vae_token = cache.owner_token(base), cache.owner_token(vae)
    assert cache.owner_token(base) == base_token != vae_token
    cache.put(((base_token, vae_token), "residuals"), entry(10))
    cache.put(((vae_token,), "latent"), entry(10))
    del base
    gc.collect()
    assert len(cache) == 1 and cache.nbytes == 40 and cache.get(((vae_token,), "latent")) is not None
    del vae
    gc.collect()
    assert len(cache) == 0 and cache.nbytes == 0


def test_clear_and_a_zero_budget():
    cache = ResidualCache(budget_bytes=1000)
    cache.put(((), 1), entry(10))
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    off = ResidualCache(budget_bytes=0)
    off.put(((), 1), entry(1))
    assert not off.enabled and len(off) == 0


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert budget_from_env() == DEFAULT_BUDGET_MB * 2**20
    monkeypatch.setenv(BUDGET_ENV, "0")
    assert budget_from_env() == 0
    monkeypatch.setenv(BUDGET_ENV, "1.5")
    assert budget_from_env() == 3 * 2**19
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(BUDGET_ENV, bad)
        with pytest.raises(ValueError, match=f"{BUDGET_ENV}='{bad}': expected a number of MiB"):
            budget_from_env()


def test_digest_follows_content_dtype_and_shape():
    a = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert tensor_digest(a) == tensor_digest(a.clone())
    assert tensor_digest(a.t()) == tensor_digest(a.t().contiguous())
    changed = a.clone()
    changed[2, 3] = torch.nextafter(changed[2, 3], torch.tensor(1e9))  # one ulp
    assert tensor_digest(changed) != tensor_digest(a)
    assert tensor_digest(a.reshape(4, 3)) != tensor_digest(a)
    assert tensor_digest(a.to(torch.bfloat16)) != tensor_digest(a.to(torch.float16))
    assert tensor_digest(torch.zeros(2, dtype=torch.bfloat16)) != tensor_digest(torch.zeros(4, dtype=torch.uint8))


def test_distinct_rows_groups_equal_keys_and_equal_contexts():
    cond, uncond = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(1))
    context = torch.stack([cond, cond, cond, uncond, uncond, uncond])  # batch 3: cond rows, then uncond rows
    firsts, inverse = distinct_rows([("hint", 0, 500.0)] * 6, context)
    assert firsts == [0, 3] and inverse == [0, 0, 0, 1, 1, 1]

    # a batch of 3 different condition images: every row its own hint
    keys = [("hint", r % 3, 500.0) for r in range(6)]
    assert distinct_rows(keys, context) == ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])

    # a context that differs in one value is another input (e.g. two prompts of area conds)
    other = context.clone()
    other[1, 5, 2] += 1e-3
    assert distinct_rows([("hint", 0, 500.0)] * 6, other) == ([0, 1, 3], [0, 1, 0, 2, 2, 2])

    # another timestep in the key
    keys = [("hint", 0, 500.0)] * 3 + [("hint", 0, 400.0)] * 3
    assert distinct_rows(keys, torch.stack([cond] * 6)) == ([0, 3], [0, 0, 0, 1, 1, 1])
