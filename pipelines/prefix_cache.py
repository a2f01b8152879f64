"""Automatic prefix caching: KV caches of prompt prefixes kept across requests.

An entry is a context of the executor (named `prefix/<n>`) holding the KV of a prompt prefix,
keyed by its block history (pipelines/blocks.py: text ids and image content hashes). A
`Session` asks for the longest cached prefix of each context it is about to prefill, forks that
entry into the request's context and prefills only the remaining blocks; right after a prefill
it offers its contexts to the cache, which forks them into new entries. Only prefilled prompt
blocks are cached, never decoded tokens: a token appended by a decode step has K/V that differ
numerically from the same token prefilled in a block, so reusing it would break exactness.

Entries are copies (KVCache forks share tensors until one side appends), so a request never
depends on an entry: evicting one frees only the cache's copy. The budget counts each entry's
tokens times the KV bytes per token of the largest stage; the least recently used entries go
first, and every entry goes when a request runs out of device memory. Entries being forked from
are pinned and never evicted meanwhile. One cache per executor; thread-safe.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger(__name__)

CACHE_REQUEST = "prefix"  # the request part of the entries' context ids (pipelines/context.py: context_name)
_entry_ids = itertools.count()  # process-wide: a new cache (after a stage-group rebuild) never reuses a name


def is_cached_prefix(context_id: str) -> bool:
    """Whether a context id is a prefix cache entry's."""
    return context_id.startswith(f"{CACHE_REQUEST}/")


@dataclass
class CachedPrefix:
    context_id: str
    history: tuple
    kv_len: int
    rope_pos: int
    image_tokens: int
    nbytes: int
    pins: int = 0


class PrefixCache:
    def __init__(self, executor, budget_bytes: int, bytes_per_token: int):
        """`executor`: the one whose contexts the entries are (not a per-request wrapper)."""
        self.executor, self.budget_bytes, self.bytes_per_token = executor, budget_bytes, bytes_per_token
        self._entries: OrderedDict[tuple, CachedPrefix] = OrderedDict()  # least recently used first
        self._adding: set[tuple] = set()
        self._lock = threading.Lock()
        self.used_bytes = 0
        self.hits = self.misses = self.evictions = self.hit_tokens = 0

    def longest(self, history: tuple, longer_than: int = 0) -> CachedPrefix | None:
        """The entry of the longest prefix of `history` with more than `longer_than` blocks."""
        with self._lock:
            for n in range(len(history), longer_than, -1):
                entry = self._entries.get(history[:n])
                if entry is not None:
                    return entry
        return None

    def pin(self, entries: list[CachedPrefix]) -> bool:
        """Keep these entries until `unpin`; False (nothing pinned) if one was evicted already."""
        with self._lock:
            if any(self._entries.get(e.history) is not e for e in entries):
                return False
            for e in entries:
                e.pins += 1
                self._entries.move_to_end(e.history)
            return True

    def unpin(self, entries: list[CachedPrefix]) -> None:
        with self._lock:
            for e in entries:
                e.pins -= 1

    def record(self, hit: CachedPrefix | None) -> None:
        """Count one context's lookup."""
        with self._lock:
            if hit is None:
                self.misses += 1
            else:
                self.hits += 1
                self.hit_tokens += hit.kv_len

    def add(self, context_id: str, history: tuple, kv_len: int, rope_pos: int, image_tokens: int) -> None:
        """Keep a copy of a context whose KV holds exactly `history` (prefilled blocks only)."""
        nbytes, key = kv_len * self.bytes_per_token, history
        with self._lock:
            if not key or key in self._adding or nbytes > self.budget_bytes:
                return
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            victims = self._take_room(nbytes)
            if victims is None:
                return
            self._adding.add(key)
            self.used_bytes += nbytes
            entry = CachedPrefix(f"{CACHE_REQUEST}/{next(_entry_ids)}", key, kv_len, rope_pos, image_tokens, nbytes)
        try:
            self._free(victims)
            self.executor.fork(context_id, entry.context_id)
        except BaseException:
            with self._lock:
                self._adding.discard(key)
                self.used_bytes -= nbytes
            self._free([entry])
            raise
        with self._lock:
            self._adding.discard(key)
            self._entries[key] = entry

    def clear(self) -> int:
        """Evict every entry that is not being forked from; returns how many went."""
        with self._lock:
            victims = [e for e in self._entries.values() if not e.pins]
            self._drop(victims)
        self._free(victims)
        return len(victims)

    def context_ids(self) -> list[str]:
        with self._lock:
            return [e.context_id for e in self._entries.values()]

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.used_bytes, "budget_bytes": self.budget_bytes,
                    "hits": self.hits, "misses": self.misses, "hit_tokens": self.hit_tokens,
                    "evictions": self.evictions}

    def _take_room(self, nbytes: int) -> list[CachedPrefix] | None:
        """Entries to evict (least recently used first, pinned ones kept) so that `nbytes` more
        fit the budget, removed from the index; None (nothing removed) if they cannot fit."""
        victims, room = [], self.budget_bytes - self.used_bytes
        for entry in self._entries.values():
            if room >= nbytes:
                break
            if not entry.pins:
                victims.append(entry)
                room += entry.nbytes
        if room < nbytes:
            return None
        self._drop(victims)
        return victims

    def _drop(self, victims: list[CachedPrefix]) -> None:
        for e in victims:
            del self._entries[e.history]
            self.used_bytes -= e.nbytes
        self.evictions += len(victims)

    def _free(self, entries: list[CachedPrefix]) -> None:
        if entries:
            self.executor.free([e.context_id for e in entries])
            log.debug("prefix cache: evicted %d entries", len(entries))
