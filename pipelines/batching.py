"""Step-level continuous batching: the denoising steps of concurrent requests share forwards.

Each request runs `sample_image` on a thread of its own and calls `executor.denoise` once per
step. An executor with a `StepBatcher` queues those calls; one waiting caller at a time (the
leader) takes a batch from the head of the queue and runs it as ONE forward through the stages
(each request's segments packed after the others', with a `StepPart` per request), and every
caller gets its own `StepOutput` back. Everything per request stays its own: contexts, KV
caches, sampler state (`SamplerStates`) and step index; only the forward is shared, so a
request's numbers are those it gets alone wherever each row's arithmetic does not depend on the
rows around it (fp32 CPU: tests/test_batching.py).

Requests join and leave at step boundaries: an image is live from its first step until its
final one (or until the executor frees it). The leader waits at most `batch_wait_s` for the live
images that have not queued their next step yet (they are handling the previous step's result)
and could still fit (a step as large as their last), and not at all when every live image is
queued, so one request alone never waits. A batch holds
at most `max_batch_tokens` query tokens (a single larger step runs alone) and is taken strictly
from the head of the queue, first come first served: no request starves.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bagel_model.segments import Segment

from .step import EulerStep, StepOutput

log = logging.getLogger(__name__)

MAX_BATCH_TOKENS = 32768  # query tokens per forward: 8 guided 512² steps (2 x 1026 each), 2 guided 1024² ones
BATCH_WAIT_S = 0.005  # far below a step's time; only waited for live images not yet queued


@dataclass(frozen=True)
class StepCall:
    """One image's step as the sampler asked for it (`Executor.denoise`'s arguments)."""

    segments: list[Segment]
    step: EulerStep

    @property
    def key(self) -> str:
        return self.segments[0].context_id

    @property
    def tokens(self) -> int:
        return sum(s.num_tokens for s in self.segments)


# run(calls) -> one result per call: its StepOutput, or the exception that call alone raised
RunBatch = Callable[[list[StepCall]], list["StepOutput | BaseException"]]


class _Pending:
    def __init__(self, call: StepCall):
        self.call = call
        self.done = False
        self.result: StepOutput | BaseException | None = None


class StepBatcher:
    def __init__(self, run: RunBatch, max_batch_tokens: int, batch_wait_s: float,
                 on_forward: Callable[[int], None] | None = None):
        """`run`: one forward of several images' steps (called by one thread at a time);
        `max_batch_tokens` >= 1; `on_forward(n)`: told the number of requests of every forward."""
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1 (0 means no batcher at all)")
        self.run, self.max_batch_tokens, self.batch_wait_s = run, max_batch_tokens, batch_wait_s
        self.on_forward = on_forward
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._live: dict[str, int] = {}  # images between their first and final step: their last step's tokens
        self._running = False  # a leader is forming or running a batch

    def denoise(self, segments: list[Segment], step: EulerStep) -> StepOutput:
        """The `Executor.denoise` of one image, run in a forward shared with other images' steps."""
        pending = _Pending(StepCall(segments, step))
        with self._cond:
            self._live[pending.call.key] = pending.call.tokens
            self._queue.append(pending)
            self._cond.notify_all()
            while not pending.done and (self._running or self._queue[0] is not pending):
                self._cond.wait()
            if not pending.done:
                self._running = True
                batch = self._take()
        if not pending.done:
            self._lead(batch)
        if isinstance(pending.result, BaseException):
            raise pending.result
        return pending.result

    def forget(self, keys: Iterable[str]) -> None:
        """These images ended without their final step (their request stopped): not live."""
        with self._cond:
            for key in keys:
                self._live.pop(key, None)
            self._cond.notify_all()

    def live(self) -> list[str]:
        with self._cond:
            return sorted(self._live)

    def _take(self) -> list[_Pending]:
        """Called by the leader, holding the lock: wait for the live images still missing (at
        most `batch_wait_s`), then take the head of the queue up to the token cap."""
        deadline = time.monotonic() + self.batch_wait_s
        while self._missing_could_join():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        batch, tokens = [], 0
        while self._queue and (not batch or tokens + self._queue[0].call.tokens <= self.max_batch_tokens):
            batch.append(self._queue.popleft())
            tokens += batch[-1].call.tokens
        return batch

    def _missing_could_join(self) -> bool:
        """Whether a live image that has not queued its next step yet could still fit in this
        forward (its next step taken as large as its last one)."""
        queued = {p.call.key for p in self._queue}
        missing = [self._live[k] for k in self._live if k not in queued]
        room = self.max_batch_tokens - sum(p.call.tokens for p in self._queue)
        return bool(missing) and min(missing) <= room

    def _lead(self, batch: list[_Pending]) -> None:
        try:
            results = self.run([p.call for p in batch])
        except BaseException as e:  # the forward as a whole failed: every step of it did
            results = [e] * len(batch)
        try:
            if self.on_forward is not None:
                self.on_forward(len(batch))
        except Exception:  # a metrics failure must not stop the batcher (every caller would hang)
            log.exception("on_forward failed")
        with self._cond:
            for pending, result in zip(batch, results):
                pending.result, pending.done = result, True
                if isinstance(result, BaseException) or pending.call.step.final:
                    self._live.pop(pending.call.key, None)
            self._running = False
            self._cond.notify_all()
