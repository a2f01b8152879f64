"""Prefix-affinity routing between the ingress replicas: a request goes to the replica that holds
its longest cached prefix (pipelines/prefix_cache.py), as long as the load stays balanced.

A request is described by affinity keys, from weakest to strongest: a hash chain of its items
(the first item, the first two, ...; texts, image bytes or pixels) for Python handle calls,
whose tasks the router sees, and its session (Serve's `X-Session-ID` header) for HTTP, whose
body Serve's proxy does not give a router (it streams the body to the chosen replica). The
router remembers which replica it sent each key to, and every replica reports the keys of its
recent requests (`record_routing_stats`, every `STATS_PERIOD_S`), so routers in other proxies
learn them too. The replica holding the strongest key wins unless its queue is longer than the
shortest by more than `max_imbalance`; otherwise (and for requests no replica knows) Serve's
power-of-two choice decides.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable

from PIL import Image
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

STATS_PERIOD_S = 1.0  # how often replicas report their keys
REPORTED_KEYS = 2048  # keys a replica reports (its most recent)


def affinity_keys(session_id: str | None, args: Iterable[object]) -> list[str]:
    """A request's keys, weakest first: its items' hash chain (tasks among `args`), then its session."""
    keys: list[str] = []
    for arg in args:
        items = getattr(arg, "items", None)
        if isinstance(items, list):
            chain = hashlib.blake2b(digest_size=12)
            for item in items:
                chain.update(_item_digest(item))
                keys.append("p:" + chain.copy().hexdigest())
    if session_id:
        keys.append("s:" + session_id)
    return keys


def _item_digest(item: object) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if isinstance(item, str):
        h.update(b"t" + item.encode("utf-8", "surrogatepass"))
    elif isinstance(item, (bytes, bytearray)):
        h.update(b"b" + bytes(item))
    elif isinstance(item, Image.Image):
        h.update(f"i{item.mode}{item.size}".encode() + item.tobytes())
    elif isinstance(getattr(item, "data", None), bytes):  # cluster/inputs.py: EncodedImage
        h.update(b"b" + item.data)
    else:
        h.update(repr(type(item)).encode())
    return h.digest()


class RecentKeys:
    """The affinity keys of a replica's recent requests (thread-safe, bounded)."""

    def __init__(self, size: int = REPORTED_KEYS):
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._size, self._lock = size, threading.Lock()

    def add(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._keys[key] = None
                self._keys.move_to_end(key)
            while len(self._keys) > self._size:
                self._keys.popitem(last=False)

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self._keys)


class PrefixAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Serve's request router for the ingress (see the module docstring)."""

    def initialize_state(self, max_imbalance: int = 2, remembered: int = 8192) -> None:
        self._max_imbalance, self._remembered = max_imbalance, remembered
        self._sent: OrderedDict[str, ReplicaID] = OrderedDict()  # key -> replica it was routed to
        self._pending_keys: OrderedDict[str, list[str]] = OrderedDict()  # request -> its keys, hashed once

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        fallback = await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        if pending_request is None or not fallback or len(candidate_replicas) < 2:
            return fallback
        holder = self._holder(self._keys_of(pending_request), candidate_replicas)
        if holder is None or not await self._balanced(holder, candidate_replicas):
            return fallback
        return [[holder], *fallback]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        keys = self._keys_of(pending_request)
        self._pending_keys.pop(pending_request.metadata.internal_request_id, None)
        for key in keys:
            self._sent[key] = replica_id
            self._sent.move_to_end(key)
        while len(self._sent) > self._remembered:
            self._sent.popitem(last=False)

    def _holder(self, keys: list[str], candidates: list[RunningReplica]) -> RunningReplica | None:
        """The candidate holding the strongest key: sent there by this router, or reported."""
        by_id = {r.replica_id: r for r in candidates}
        reported = [(r, set((r.routing_stats or {}).get("keys", ()))) for r in candidates]
        for key in reversed(keys):
            sent = self._sent.get(key)
            if sent in by_id:
                return by_id[sent]
            for replica, held in reported:
                if key in held:
                    return replica
        return None

    async def _balanced(self, holder: RunningReplica, candidates: list[RunningReplica]) -> bool:
        """Whether the holder's queue is at most `max_imbalance` longer than the shortest."""
        lengths: dict[ReplicaID, int] = {}
        unknown = []
        for r in candidates:
            cached = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if cached is None:
                unknown.append(r)
            else:
                lengths[r.replica_id] = cached
        if unknown:
            for r, length in await self._probe_queue_lens(unknown, 0):
                if length is not None:
                    lengths[r.replica_id] = length
        mine = lengths.get(holder.replica_id)
        if mine is None or mine >= holder.max_ongoing_requests:
            return False
        return mine - min(lengths.values()) <= self._max_imbalance

    def _keys_of(self, pending_request: PendingRequest) -> list[str]:
        request = pending_request.metadata.internal_request_id
        keys = self._pending_keys.get(request)
        if keys is None:
            keys = self._pending_keys[request] = affinity_keys(pending_request.metadata.session_id,
                                                               pending_request.args)
            while len(self._pending_keys) > self._remembered:
                self._pending_keys.popitem(last=False)
        return keys
