"""Admission control: a bounded queue, a KV-cache budget and a budget for decoded input images.

A request enters at once when fewer than `max_running + max_queued` requests are in the system
(otherwise `Overloaded`, HTTP 429 with Retry-After, before any response starts) and then waits
until the stages have room for its KV caches (`kv_budget_bytes` per stage, estimated from its
inputs) and the ingress has room for its decoded images (`image_budget_bytes`, estimated from
their headers); a streamed request is already streaming by then, so it gets keep-alives while it
waits. A request that could never fit is refused with `InvalidRequest`.
"""
from __future__ import annotations

import asyncio
import math

from bagel_model.config import BagelConfig
from bagel_model.cost import kv_bytes_per_token
from bagel_model.errors import InvalidRequest
from bagel_model.segments import image_block_len
from bagel_model.tokenizer import BagelTokenizer
from PIL import Image

from .api import ImageTask, TextTask
from .errors import Cancelled, Overloaded
from .inputs import EncodedImage


class Admission:
    def __init__(self, max_running: int, max_queued: int, kv_budget_bytes: int | None, retry_after_s: int,
                 image_budget_bytes: int | None = None):
        self.limit = max_running + max_queued
        self.kv_budget = kv_budget_bytes
        self.image_budget = image_budget_bytes
        self.retry_after_s = retry_after_s
        self.in_system = 0
        self.kv_reserved = 0
        self.image_reserved = 0
        self._changed = asyncio.Condition()
        self._notifying: set[asyncio.Task] = set()  # held until done (the loop keeps only weak references)

    def enter(self, kv_bytes: int, image_bytes: int = 0) -> None:
        """Take a place in the system, or raise at once."""
        if self.in_system >= self.limit:
            raise Overloaded(f"server busy: {self.in_system} requests in flight or queued; retry later",
                             retry_after_s=self.retry_after_s)
        if self.kv_budget is not None and kv_bytes > self.kv_budget:
            raise InvalidRequest(f"the request needs ~{kv_bytes} bytes of KV cache per stage; "
                                 f"the service has {self.kv_budget}: use fewer or smaller images or tokens")
        if self.image_budget is not None and image_bytes > self.image_budget:
            raise InvalidRequest(f"the request's images need ~{image_bytes} bytes decoded; the service has "
                                 f"{self.image_budget}: use fewer or smaller images")
        self.in_system += 1

    async def reserve(self, kv_bytes: int, image_bytes: int, cancelled: asyncio.Future) -> None:
        """Wait until there is room for `kv_bytes` and `image_bytes` and reserve it; raises
        `Cancelled` when `cancelled` is done first (nothing is reserved then)."""
        if self._room(kv_bytes, image_bytes):
            self._take(kv_bytes, image_bytes)
            return
        room = asyncio.ensure_future(self._wait_for_room(kv_bytes, image_bytes))
        await asyncio.wait({room, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        if not room.done():
            room.cancel()
            raise Cancelled("request cancelled while waiting for room")

    async def _wait_for_room(self, kv_bytes: int, image_bytes: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._room(kv_bytes, image_bytes))
            self._take(kv_bytes, image_bytes)

    def _room(self, kv_bytes: int, image_bytes: int) -> bool:
        return (self._fits(self.kv_reserved + kv_bytes, self.kv_budget)
                and self._fits(self.image_reserved + image_bytes, self.image_budget))

    def _take(self, kv_bytes: int, image_bytes: int) -> None:
        self.kv_reserved += kv_bytes
        self.image_reserved += image_bytes

    def leave(self, kv_bytes: int = 0, image_bytes: int = 0) -> None:
        """Give up the place and the reserved room (0 where none was reserved)."""
        self.in_system -= 1
        self.kv_reserved -= kv_bytes
        self.image_reserved -= image_bytes
        if kv_bytes or image_bytes:
            task = asyncio.ensure_future(self._notify())
            self._notifying.add(task)
            task.add_done_callback(self._notifying.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    @staticmethod
    def _fits(total: int, budget: int | None) -> bool:
        return budget is None or total <= budget


def kv_bytes_estimate(task: ImageTask | TextTask, config: BagelConfig, tokenizer: BagelTokenizer,
                      layers_per_stage: int, dtype_bytes: int, max_prompt_tokens: int) -> int:
    """Upper estimate of the KV bytes one stage holds for this request at once."""
    text_tokens, image_tokens = 0, 0
    if isinstance(task, ImageTask) and task.negative_prompt:
        text_tokens += len(tokenizer.text_block(tokenizer.encode(task.negative_prompt)))
    for item in task.items:
        if isinstance(item, str):
            text_tokens += len(tokenizer.text_block(tokenizer.encode(item)))
        else:
            size = item.size if isinstance(item, (Image.Image, EncodedImage)) else (config.max_image_side,) * 2
            (w, h), (vw, vh) = config.input_image_sizes(*size)
            image_tokens += image_block_len(math.prod(config.latent_grid(h, w)))
            image_tokens += image_block_len(math.prod(config.vit_grid(vh, vw)))
    if text_tokens > max_prompt_tokens:
        raise InvalidRequest(f"the prompt has {text_tokens} tokens; at most {max_prompt_tokens} are accepted")
    new_tokens = task.params.max_new_tokens if isinstance(task, TextTask) else (
        task.text_params.max_new_tokens if task.think else 0)
    context = text_tokens + image_tokens + new_tokens + 200  # + a think system prompt
    # The conditional context, a fork that keeps its old tensors (cfg_text or the decode copy),
    # and the text-only cfg_img context.
    return kv_bytes_per_token(config.llm, dtype_bytes, layers_per_stage) * (2 * context + text_tokens)
