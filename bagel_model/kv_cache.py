"""KV caches of one stage's layers for every live context.

Keys are stored after qk-norm and RoPE, `[tokens, kv_heads, head_dim]` per layer. Appending
builds new tensors, so a forked context can share its parent's tensors safely. The cache knows
nothing about requests: callers free the contexts they created.
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, layers: range):
        self.layers = layers
        self._data: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}

    def get(self, context_id: str, layer: int) -> tuple[Tensor, Tensor] | None:
        entry = self._data.get(context_id)
        return None if entry is None else entry.get(layer)

    def append(self, context_id: str, layer: int, k: Tensor, v: Tensor) -> None:
        entry = self._data.setdefault(context_id, {})
        old = entry.get(layer)
        entry[layer] = (k, v) if old is None else (torch.cat([old[0], k]), torch.cat([old[1], v]))

    def fork(self, src: str, dst: str) -> None:
        """`dst` becomes an independent copy of `src` (empty if `src` has no cache)."""
        if dst in self._data:
            raise ValueError(f"context {dst!r} already exists")
        self._data[dst] = dict(self._data.get(src, {}))

    def free(self, context_ids: list[str]) -> None:
        for context_id in context_ids:
            self._data.pop(context_id, None)

    def context_ids(self) -> list[str]:
        return list(self._data)

    def length(self, context_id: str) -> int:
        entry = self._data.get(context_id)
        return 0 if not entry else next(iter(entry.values()))[0].shape[0]

    def nbytes(self) -> int:
        seen, total = set(), 0
        for entry in self._data.values():
            for k, v in entry.values():
                for t in (k, v):
                    if id(t) not in seen:
                        seen.add(id(t))
                        total += t.numel() * t.element_size()
        return total
