"""Control residuals computed once per distinct input (pure torch; no ComfyUI needed).

The CtrLoRA Base ControlNet never sees the noisy latent: the residuals of one sample row
depend only on its condition latents, the LoRAs (identities, strengths, condition weights),
the block weighting, its timestep, its text context, the compute dtype and the latent size.
Two things follow:

- inside one model call, rows with equal inputs (the B copies of the prompt in a batch of B)
  need one computation (`distinct_rows`);
- a later run that meets the same inputs again (the same graph re-queued with a new seed:
  same sampler, steps and scheduler, hence the same timesteps) can take the residuals from
  a previous run (`ResidualCache`).

`ResidualCache` is a least-recently-used map from keys to lists of tensors with a byte
budget. A key is a tuple whose first item is the tuple of its "owners'" tokens (the base
handle, the VAE: `owner_token`); when an owner is garbage-collected (its node output left ComfyUI's cache, e.g. "Free model and node cache"),
its entries are dropped. `SHARED` is the pack's instance; its budget comes from the
environment variable CTRLORA_RESIDUAL_CACHE_MB (default 1024 MiB; 0 turns it off).
"""
from __future__ import annotations

import hashlib
import os
import threading
import uuid
import weakref
from collections import OrderedDict
from typing import Any, Hashable, Sequence

import torch

BUDGET_ENV = "CTRLORA_RESIDUAL_CACHE_MB"
DEFAULT_BUDGET_MB = 1024


def tensor_digest(tensor: torch.Tensor) -> str:
    """A content hash of `tensor` (dtype, shape and bytes); copies it to the host when needed."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.blake2b(f"{data.dtype}{tuple(data.shape)}".encode(), digest_size=16)
    digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def distinct_rows(row_keys: Sequence[Hashable], context: torch.Tensor) -> tuple[list[int], list[int]]:
    """Rows with equal keys and equal context rows share one computation.

    Returns (`firsts`, `inverse`): the first row of each distinct input, and for every row
    the position of its input in `firsts`. `context` is [rows, ...]; contexts are compared
    exactly, one vectorised comparison per distinct context.
    """
    context_group = [-1] * context.shape[0]
    for row in range(context.shape[0]):
        if context_group[row] < 0:
            same = (context == context[row]).flatten(1).all(1).tolist()
            for other in range(row, context.shape[0]):
                if same[other] and context_group[other] < 0:
                    context_group[other] = row
    firsts: list[int] = []
    position: dict[tuple, int] = {}
    inverse = []
    for row, key in enumerate(row_keys):
        signature = (key, context_group[row])
        if signature not in position:
            position[signature] = len(firsts)
            firsts.append(row)
        inverse.append(position[signature])
    return firsts, inverse


def budget_from_env() -> int:
    """The byte budget CTRLORA_RESIDUAL_CACHE_MB asks for (MiB, default 1024; 0 = off)."""
    value = os.environ.get(BUDGET_ENV, "").strip()
    if not value:
        return DEFAULT_BUDGET_MB * 2**20
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:
        raise ValueError(f"{BUDGET_ENV}={value!r}: expected a number of MiB >= 0 (0 turns the residual cache off)")
    return int(megabytes * 2**20)


class ResidualCache:
    """A thread-safe LRU of tensor lists, at most `budget_bytes` in total."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[list[torch.Tensor], int]] = OrderedDict()
        self._tokens: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def owner_token(self, owner: Any) -> str:
        """A token for `owner` to put in keys; its entries are dropped when `owner` is collected."""
        with self._lock:
            token = self._tokens.get(owner)
            if token is None:
                token = uuid.uuid4().hex
                self._tokens[owner] = token
                weakref.finalize(owner, self.drop_owner, token)
        return token

    def get(self, key: Hashable) -> list[torch.Tensor] | None:
        """The tensors stored under `key` (the stored objects: callers copy before writing), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Hashable, tensors: list[torch.Tensor]) -> None:
        """Store `tensors` (owned by the cache from now on); evict the oldest entries beyond the budget."""
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.budget_bytes:
            return
        with self._lock:
            if key in self._entries:
                self.nbytes -= self._entries.pop(key)[1]
            self._entries[key] = (tensors, size)
            self.nbytes += size
            while self.nbytes > self.budget_bytes:
                self.nbytes -= self._entries.popitem(last=False)[1][1]

    def drop_owner(self, token: str) -> None:
        """Forget every entry whose key names `token` among its owners (the key's first item)."""
        with self._lock:
            for key in [k for k in self._entries if token in k[0]]:
                self.nbytes -= self._entries.pop(key)[1]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0


SHARED = ResidualCache(budget_from_env())
