"""Conversation contexts: what the model has seen, as KV caches held by the executor.

A `Context` is bookkeeping only (`kv_len`, `rope_pos`, and `history`, the keys of the blocks it
holds or will hold); the tensors stay in the executor. A `Session` creates, forks and appends to
the contexts of one request and frees every one of them on `close()`, whatever happened (spec
§4.4, §5.1). Appending only queues a block (pipelines/blocks.py); the queue runs when a context
is used (`fork`, `materialize`): each context first takes the longest prefix of its blocks that
the executor's prefix cache holds (pipelines/prefix_cache.py), then the remaining blocks are
prefilled one executor call per append, as they were queued, so the numbers are the same with
and without the cache. A call whose contexts do not all skip it runs for all of them (a context
then takes a shorter prefix): batching never changes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .blocks import Block, text_block
from .executor import Executor
from .prefix_cache import CachedPrefix, PrefixCache

_ids = itertools.count()


@dataclass
class Context:
    context_id: str
    kv_len: int = 0
    rope_pos: int = 0
    history: tuple = field(default_factory=tuple)  # the key of every appended block (pipelines/blocks.py)
    image_tokens: int = 0  # of kv_len: the input images' blocks, markers included (usage counts)
    cached_tokens: int = 0  # of kv_len: reused from the prefix cache
    prefilled: int = 0  # blocks of `history` in the executor's cache; the others are queued
    packing: tuple = field(default_factory=tuple)  # per block: the contexts its prefill call held

    def cache_key(self) -> tuple:
        """The prefix cache's key of this context's blocks: each block's key with the number of
        contexts its prefill call held, since that call's GEMM shapes (and so, on a GPU, its
        kernels and rounding) depend on it; a prefix is reused only where it was computed alike."""
        return tuple(zip(self.history, self.packing))


def context_name(context_id: str) -> tuple[str, str]:
    """(request id, name) of a context id made by `Session.new`: an executor that places a
    request's contexts (the cluster's CFG-parallel branch groups) reads what each is for here."""
    request, _, tail = context_id.rpartition("/")
    return request, tail.rstrip("0123456789")


class Session:
    """The contexts of one request."""

    def __init__(self, executor: Executor, request_id: str | None = None):
        self.executor = executor
        self.request_id = request_id or f"req{next(_ids)}"
        self._created: list[str] = []
        self._count = itertools.count()
        self._queued: list[tuple[Block, list[tuple[Context, int]]]] = []  # block, (context, its index in history)

    def new(self, name: str) -> Context:
        """A context named `name` (the sampler's contexts are named by their `Branch`)."""
        context = Context(f"{self.request_id}/{name}{next(self._count)}")
        self._created.append(context.context_id)
        return context

    def fork(self, src: Context, name: str) -> Context:
        self.materialize()
        dst = self.new(name)
        self.executor.fork(src.context_id, dst.context_id)
        dst.kv_len, dst.rope_pos, dst.history, dst.image_tokens = src.kv_len, src.rope_pos, src.history, src.image_tokens
        dst.cached_tokens, dst.prefilled, dst.packing = src.cached_tokens, src.prefilled, src.packing
        return dst

    def release(self, context: Context) -> None:
        """Free one context early (e.g. a temporary fork)."""
        self._queued = [(b, kept) for b, members in self._queued
                        if (kept := [(c, i) for c, i in members if c is not context])]
        self.executor.free([context.context_id])
        self._created.remove(context.context_id)

    def close(self) -> None:
        """Free every context this session created."""
        self._queued = []
        if self._created:
            self.executor.free(self._created)
            self._created = []

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def append(self, contexts: list[Context], block: Block) -> None:
        """Queue `block` for these contexts: one executor call for all of them."""
        members = []
        for c in contexts:
            members.append((c, len(c.history)))
            c.history += (block.key,)
            c.packing += (len(contexts),)
        self._queued.append((block, members))

    def append_text(self, contexts: list[Context], token_ids: list[int]) -> None:
        """Queue the block <|im_start|> ids <|im_end|> for each context."""
        self.append(contexts, text_block(self.executor.tokenizer.text_block(token_ids)))

    def materialize(self) -> None:
        """Bring every context up to its history: reuse cached prefixes, prefill the rest, and
        offer the results to the prefix cache."""
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        contexts = list({id(c): c for _, members in queued for c, _ in members}.values())
        cache: PrefixCache | None = getattr(self.executor, "prefix_cache", None)
        if cache is not None:
            self._reuse(cache, contexts, queued)
        for block, members in queued:
            run = [c for c, i in members if i >= c.prefilled]
            if not run:
                continue
            segments = [block.segment(c.context_id, c.rope_pos) for c in run]
            try:
                self.executor.prefill(segments)
            except Exception as e:
                if cache is not None and _out_of_memory(e):  # running requests win over cached prefixes
                    cache.clear()
                raise
            for c, segment in zip(run, segments):
                c.kv_len += segment.num_tokens
                c.rope_pos += 1 if block.is_image else segment.num_tokens  # an image block has one position
                c.image_tokens += segment.num_tokens if block.is_image else 0
                c.prefilled += 1
        if cache is not None:
            for c in contexts:
                cache.add(c.context_id, c.cache_key(), c.kv_len, c.rope_pos, c.image_tokens)

    def _reuse(self, cache: PrefixCache, contexts: list[Context],
               queued: list[tuple[Block, list[tuple[Context, int]]]]) -> None:
        """Fork each context's longest cached prefix into it, such that every queued call is
        skipped by all its contexts or by none."""
        limit = {id(c): len(c.history) for c in contexts}
        while True:
            hits = {id(c): cache.longest(c.cache_key()[:limit[id(c)]], c.prefilled) for c in contexts}
            reach = {k: len(h.history) for k, h in hits.items() if h is not None}
            split = []
            for _, members in queued:
                skipping = [(c, i) for c, i in members if i < reach.get(id(c), 0)]
                if len(skipping) < len(members):
                    split += skipping
            for c, i in split:
                limit[id(c)] = min(limit[id(c)], i)
            chosen = [h for h in hits.values() if h is not None]
            if not split and cache.pin(chosen):
                break
        try:
            for c in contexts:
                hit = hits[id(c)]
                cache.record(hit)
                if hit is not None:
                    self._take(c, hit)
        finally:
            cache.unpin(chosen)

    def _take(self, context: Context, prefix: CachedPrefix) -> None:
        """`context` becomes a copy of a cached prefix of its history."""
        self.executor.free([context.context_id])  # what it holds (a shorter prefix, or an empty fork)
        self.executor.fork(prefix.context_id, context.context_id)
        context.kv_len, context.rope_pos, context.image_tokens = prefix.kv_len, prefix.rope_pos, prefix.image_tokens
        context.prefilled, context.cached_tokens = len(prefix.history), prefix.kv_len


def _out_of_memory(error: BaseException) -> bool:
    """A device OOM, raised here or in a stage worker (Ray's error keeps it as `cause`)."""
    return any(isinstance(e, torch.OutOfMemoryError) for e in (error, getattr(error, "cause", None)))
