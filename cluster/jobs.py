"""`Job`: one request's work, from admission to its result, seen from the event loop.

The pipelines are synchronous, so each request runs on a thread of a pool once admitted. The
thread reports events (progress, text deltas) through `emit`, which is also where it stops: a
cancelled or overdue request raises there, at its next step, and the pipeline frees its contexts
on the way out. The loop side awaits the result (`result`) or iterates the events (`stream`,
which yields `KEEPALIVE` whenever nothing happened for `keepalive_s`, e.g. while the request
waits in the queue); a caller that is cancelled (a client that went away) cancels the job.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from .errors import Cancelled, DeadlineExceeded

KEEPALIVE: dict = {"type": "keep-alive"}  # the event `stream` yields on silence (sent as an SSE comment)


class Job:
    def __init__(self, request_id: str, timeout_s: float, keepalive_s: float = 15.0):
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.created = time.monotonic()
        self.timeout_s, self.keepalive_s = timeout_s, keepalive_s
        self.future: asyncio.Future | None = None
        self.cancelled: asyncio.Future = self.loop.create_future()  # done once the job is cancelled
        self.phases: dict[str, float] = defaultdict(float)  # seconds per phase (cluster/phases.py)
        self.first_event_s: float | None = None  # after `created`, the first progress or text event
        self._cancelled = threading.Event()

    def start(self, work: Coroutine) -> None:
        """Run the job's lifecycle (waiting for room, then its thread). Nothing cancels it: it
        always ends by itself, so whatever it holds is released. Its exception is retrieved
        here, so one that nobody awaits (the client went away) is not reported as lost."""
        self.future = asyncio.ensure_future(work)
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def cancel(self) -> None:
        """Stop the job at its next step (any thread)."""
        self._cancelled.set()
        self.loop.call_soon_threadsafe(lambda: self.cancelled.done() or self.cancelled.set_result(None))

    def check(self) -> None:
        """Raise if the request was cancelled or is overdue (worker thread)."""
        if self._cancelled.is_set():
            raise Cancelled("request cancelled")
        if time.monotonic() - self.created > self.timeout_s:
            raise DeadlineExceeded(f"request took longer than {self.timeout_s:.0f} s")

    def emit(self, event: dict) -> None:
        """Send an event to the client (worker thread); raises where `check` does."""
        self.check()
        if self.first_event_s is None and event["type"] != "started":
            self.first_event_s = time.monotonic() - self.created
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def result(self) -> Any:
        """The work's result. Cancelling the caller cancels the job."""
        try:
            return await asyncio.shield(self.future)
        except asyncio.CancelledError:
            self.cancel()
            raise

    async def stream(self) -> AsyncIterator[dict]:
        """The events as they come, `KEEPALIVE` after each `keepalive_s` without one, until the
        work has finished (its exception is raised)."""
        while not (self.future.done() and self.events.empty()):
            getter = asyncio.ensure_future(self.events.get())
            done, _ = await asyncio.wait({getter, self.future}, timeout=self.keepalive_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
                continue
            getter.cancel()
            if not done:
                yield KEEPALIVE
        self.future.result()


def cancel_all(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancel()
