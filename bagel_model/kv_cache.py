"""KV caches of one stage's layers for every live context.

Keys are stored after qk-norm and RoPE, `[tokens, kv_heads, head_dim]` per layer. Appending
builds new tensors, so a forked context can share its parent's tensors safely. The cache knows
nothing about requests: callers free the contexts they created.

Contexts being decoded token by token move into *slots*: preallocated per-layer buffers
`[slots, kv_heads, capacity + 1, head_dim]` whose addresses stay fixed, so a decode step can be
a replayed CUDA graph (`decode_step.py`). A slotted context moves back to ordinary tensors as
soon as anything else touches it; every method sees the same contents either way.
"""
from __future__ import annotations

import torch
from torch import Tensor

MIN_CAPACITY = 512
MAX_CAPACITY = 32768


def _bucket(n: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least)."""
    return 1 << (max(n, least) - 1).bit_length()


class SlotStorage:
    """Per-layer K/V buffers of the decode slots. Column `capacity` is scratch for rows that
    take no part in a step. `version` changes whenever the buffers are reallocated."""

    def __init__(self):
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        self.slots = self.capacity = self.version = 0

    def ensure(self, layers: range, slots: int, capacity: int, like: Tensor) -> None:
        """Grow to at least `slots` x `capacity` (powers of two), keeping the contents."""
        slots, capacity = max(slots, self.slots), max(capacity, self.capacity)
        if slots == self.slots and capacity == self.capacity:
            return
        heads, dim = like.shape[1], like.shape[-1]  # a cached key [L, H, d] or a slot buffer [S, H, C, d]
        for layer in layers:
            for store in (self.k, self.v):
                new = torch.zeros(slots, heads, capacity + 1, dim, dtype=like.dtype, device=like.device)
                if layer in store:
                    new[:self.slots, :, :self.capacity] = store[layer][:, :, :self.capacity]
                store[layer] = new
        self.slots, self.capacity, self.version = slots, capacity, self.version + 1


class KVCache:
    def __init__(self, layers: range, max_slots: int = 8):
        self.layers = layers
        self.max_slots = max_slots
        self.storage = SlotStorage()
        self._data: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
        self._slot: dict[str, int] = {}  # slotted context -> slot index
        self._slot_len: dict[str, int] = {}
        self._last_used: dict[str, int] = {}
        self._clock = 0

    def get(self, context_id: str, layer: int) -> tuple[Tensor, Tensor] | None:
        self._unslot(context_id)
        entry = self._data.get(context_id)
        return None if entry is None else entry.get(layer)

    def append(self, context_id: str, layer: int, k: Tensor, v: Tensor) -> None:
        self._unslot(context_id)
        entry = self._data.setdefault(context_id, {})
        old = entry.get(layer)
        entry[layer] = (k, v) if old is None else (torch.cat([old[0], k]), torch.cat([old[1], v]))

    def fork(self, src: str, dst: str) -> None:
        """`dst` becomes an independent copy of `src` (empty if `src` has no cache)."""
        if dst in self._data or dst in self._slot:
            raise ValueError(f"context {dst!r} already exists")
        self._unslot(src)
        self._data[dst] = dict(self._data.get(src, {}))

    def free(self, context_ids: list[str]) -> None:
        for context_id in context_ids:
            self._data.pop(context_id, None)
            self._slot.pop(context_id, None)
            self._slot_len.pop(context_id, None)
            self._last_used.pop(context_id, None)

    def context_ids(self) -> list[str]:
        return list(self._data) + [c for c in self._slot if c not in self._data]

    def length(self, context_id: str) -> int:
        if context_id in self._slot:
            return self._slot_len[context_id]
        entry = self._data.get(context_id)
        return 0 if not entry else next(iter(entry.values()))[0].shape[0]

    def nbytes(self, context_ids: list[str] | None = None) -> int:
        """Bytes held by these contexts (default: all), tensors they share counted once."""
        wanted = None if context_ids is None else set(context_ids)
        seen, total = set(), 0
        for context_id, entry in self._data.items():
            if wanted is not None and context_id not in wanted:
                continue
            for k, v in entry.values():
                for t in (k, v):
                    if id(t) not in seen:
                        seen.add(id(t))
                        total += t.numel() * t.element_size()
        if self._slot:
            k = next(iter(self.storage.k.values()))
            per_token = 2 * len(self.layers) * k.shape[1] * k.shape[3] * k.element_size()
            total += per_token * sum(n for c, n in self._slot_len.items() if wanted is None or c in wanted)
        return total

    # Decode slots -------------------------------------------------------------------------

    def slot_in(self, context_ids: list[str], extra: int) -> list[int] | None:
        """Move these contexts into slots with room for `extra` more tokens each and return
        their slot indices, or None when they do not fit (too many, or too long)."""
        lengths = [self.length(c) for c in context_ids]
        if len(context_ids) > self.max_slots or max(lengths) + extra > MAX_CAPACITY:
            return None
        like = self._any_tensor(context_ids)
        if like is None:
            return None
        wanted = set(context_ids)
        free = sorted(set(range(self.max_slots)) - set(self._slot.values()))
        newcomers = [c for c in context_ids if c not in self._slot]
        for victim in sorted((c for c in self._slot if c not in wanted), key=self._last_used.get):
            if len(free) >= len(newcomers):
                break
            free.append(self._slot[victim])
            self._unslot(victim)
        free.sort()
        slots = {c: self._slot.get(c) for c in context_ids}
        for c in newcomers:
            slots[c] = free.pop(0)
        self.storage.ensure(self.layers, _bucket(max(slots.values()) + 1),
                            _bucket(max(lengths) + extra, MIN_CAPACITY), like)
        for c in newcomers:
            self._move_in(c, slots[c])
        self._clock += 1
        for c in context_ids:
            self._last_used[c] = self._clock
        return [slots[c] for c in context_ids]

    def advance(self, context_ids: list[str], n: int = 1) -> None:
        """Record that a decode step wrote `n` tokens into these slotted contexts."""
        for c in context_ids:
            self._slot_len[c] += n

    def _any_tensor(self, context_ids: list[str]) -> Tensor | None:
        """A cached key tensor to take dtype, device and head shape from."""
        for c in context_ids:
            if c in self._slot:
                return next(iter(self.storage.k.values()))
            entry = self._data.get(c)
            if entry:
                return next(iter(entry.values()))[0]
        return next(iter(self.storage.k.values()), None)

    def _move_in(self, context_id: str, slot: int) -> None:
        entry = self._data.pop(context_id, {})
        length = 0
        for layer, (k, v) in entry.items():
            length = k.shape[0]
            self.storage.k[layer][slot, :, :length] = k.transpose(0, 1)
            self.storage.v[layer][slot, :, :length] = v.transpose(0, 1)
        self._slot[context_id], self._slot_len[context_id] = slot, length

    def _unslot(self, context_id: str) -> None:
        slot = self._slot.pop(context_id, None)
        if slot is None:
            return
        length = self._slot_len.pop(context_id)
        self._last_used.pop(context_id, None)
        if length:
            self._data[context_id] = {
                layer: (self.storage.k[layer][slot, :, :length].transpose(0, 1).contiguous(),
                        self.storage.v[layer][slot, :, :length].transpose(0, 1).contiguous())
                for layer in self.layers}
