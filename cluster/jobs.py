"""`Job`: one request's work on a worker thread, seen from the event loop.

The pipelines are synchronous, so each request runs on a thread of a pool. The thread reports
events (progress, text deltas) through `emit`, which is also where it stops: a cancelled or
overdue request raises there, at its next step, and the pipeline frees its contexts on the way
out. The loop side awaits the result (`result`) or iterates the events (`stream`); a caller that
is cancelled (a client that went away) cancels the job.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any

from .errors import Cancelled, DeadlineExceeded


class Job:
    def __init__(self, request_id: str, timeout_s: float):
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.created = time.monotonic()
        self.timeout_s = timeout_s
        self.future: asyncio.Future | None = None
        self._cancelled = threading.Event()

    def submit(self, pool: Executor, work: Callable[[], Any]) -> None:
        """Run `work` on the pool. Not in the caller's context: there Ray would count the stage
        calls as children of the Serve request, and cancel them with it (before the pipeline could
        free its contexts)."""
        self.future = asyncio.wrap_future(pool.submit(work))

    def cancel(self) -> None:
        self._cancelled.set()

    def check(self) -> None:
        """Raise if the request was cancelled or is overdue (worker thread)."""
        if self._cancelled.is_set():
            raise Cancelled("request cancelled")
        if time.monotonic() - self.created > self.timeout_s:
            raise DeadlineExceeded(f"request took longer than {self.timeout_s:.0f} s")

    def emit(self, event: dict) -> None:
        """Send an event to the client (worker thread); raises where `check` does."""
        self.check()
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def result(self) -> Any:
        """The work's result. Cancelling the caller cancels the job; the thread still ends
        normally (shielded), so whatever it holds is released."""
        try:
            return await asyncio.shield(self.future)
        except asyncio.CancelledError:
            self.cancel()
            raise

    async def stream(self) -> AsyncIterator[dict]:
        """The events as they come, until the work has finished (its exception is raised)."""
        while not (self.future.done() and self.events.empty()):
            getter = asyncio.ensure_future(self.events.get())
            await asyncio.wait({getter, self.future}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        self.future.result()


def cancel_all(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancel()
