"""Conversation contexts: what the model has seen, as KV caches held by the executor.

A `Context` is bookkeeping only (`kv_len`, `rope_pos`, and `history`, the list of blocks it
holds); the tensors stay in the executor. A `Session` creates, forks and appends to the contexts
of one request and frees every one of them on `close()`, whatever happened (spec §4.4, §5.1).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from torch import Tensor

from bagel_model.segments import Segment

from .executor import Executor

_ids = itertools.count()


@dataclass
class Context:
    context_id: str
    kv_len: int = 0
    rope_pos: int = 0
    history: tuple = field(default_factory=tuple)  # one entry per appended block, for equality checks
    image_tokens: int = 0  # of kv_len: the input images' blocks, markers included (usage counts)


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

    def new(self, name: str) -> Context:
        """A context named `name` (the sampler's contexts are named by their `Branch`)."""
        context = Context(f"{self.request_id}/{name}{next(self._count)}")
        self._created.append(context.context_id)
        return context

    def fork(self, src: Context, name: str) -> Context:
        dst = self.new(name)
        self.executor.fork(src.context_id, dst.context_id)
        dst.kv_len, dst.rope_pos, dst.history, dst.image_tokens = src.kv_len, src.rope_pos, src.history, src.image_tokens
        return dst

    def release(self, context: Context) -> None:
        """Free one context early (e.g. a temporary fork)."""
        self.executor.free([context.context_id])
        self._created.remove(context.context_id)

    def close(self) -> None:
        """Free every context this session created."""
        if self._created:
            self.executor.free(self._created)
            self._created = []

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def append_text(self, contexts: list[Context], token_ids: list[int]) -> None:
        """Append the block <|im_start|> ids <|im_end|> to each context, in one executor call."""
        ids = self.executor.tokenizer.text_block(token_ids)
        self.executor.prefill([Segment.text(c.context_id, ids, c.rope_pos) for c in contexts])
        for c in contexts:
            c.kv_len += len(ids)
            c.rope_pos += len(ids)
            c.history += (("text", tuple(ids)),)

    def append_vit(self, context: Context, embeds: Tensor, key: object) -> None:
        """Append a ViT image block."""
        self._append_image(context, Segment.vit(context.context_id, embeds, context.rope_pos), ("vit", key))

    def append_vae(self, context: Context, latents: Tensor, grid: tuple[int, int], key: object) -> None:
        """Append a clean VAE image block (generation expert, t = 0)."""
        self._append_image(context, Segment.vae(context.context_id, latents, grid, context.rope_pos), ("vae", key))

    def _append_image(self, context: Context, block: Segment, entry: tuple) -> None:
        """All tokens of an image block share one RoPE position."""
        self.executor.prefill([block])
        context.kv_len += block.num_tokens
        context.image_tokens += block.num_tokens
        context.rope_pos += 1
        context.history += (entry,)
