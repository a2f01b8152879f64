"""`StageSupervisor`: keeps the pipeline's stage group working.

The stage workers are plain Ray actors created by the ingress (one gang, placed together), so
Serve does not restart them: when one dies, every KV cache of the group is lost anyway, and the
supervisor replaces the whole group. It tries a bounded number of times with exponential backoff,
logging each failure; then it gives up and says so (`state == "failed"`), so that `/health`
reports `failed` and the ingress's `check_health` raises, and Serve replaces the replica (which
builds a new group).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

from .errors import describe
from .stage_group import StageGroup

log = logging.getLogger("ray.serve")

MAX_BACKOFF_S = 60.0

State = Literal["ok", "restarting", "failed"]


class StageSupervisor:
    def __init__(self, make_group: Callable[[], StageGroup], *, max_tries: int, backoff_s: float,
                 on_replaced: Callable[[StageGroup], None] = lambda group: None,
                 sleep: Callable[[float], None] = time.sleep):
        self.make_group, self.max_tries, self.backoff_s = make_group, max_tries, backoff_s
        self.on_replaced, self.sleep = on_replaced, sleep
        self.group = make_group()
        self.state: State = "ok"
        self.error: str | None = None  # why the last rebuild gave up
        self.rebuilding: threading.Thread | None = None
        self._lock = threading.Lock()

    def stage_failed(self, error: BaseException) -> None:
        """A stage worker died (any thread may call this): rebuild the group in the background,
        once however many requests saw the failure."""
        with self._lock:
            if self.state != "ok":
                return
            self.state = "restarting"
        log.warning("stage worker failed (%s); rebuilding the stage group", describe(error))
        self.rebuilding = threading.Thread(target=self._rebuild, name="stage-rebuild", daemon=True)
        self.rebuilding.start()

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based)."""
        return min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)

    def _rebuild(self) -> None:
        try:
            self.group.shutdown()
        except Exception as e:  # the group is broken already; its actors are killed either way
            log.info("shutting down the old stage group: %s", describe(e))
        for attempt in range(1, self.max_tries + 1):
            start = time.monotonic()
            try:
                group = self.make_group()
            except Exception as e:
                error = describe(e)
                if attempt == self.max_tries:
                    break
                delay = self.backoff(attempt)
                log.warning("rebuilding the stage group failed (attempt %d of %d): %s; next attempt in %.1f s",
                            attempt, self.max_tries, error, delay)
                self.sleep(delay)
                continue
            self.group = group
            self.on_replaced(group)
            self.state = "ok"
            log.info("stage group rebuilt in %.1f s (attempt %d of %d)", time.monotonic() - start, attempt,
                     self.max_tries)
            return
        self.error = f"the stage workers could not be rebuilt ({self.max_tries} attempts); last error: {error}"
        self.state = "failed"
        log.error("%s; giving up: /health reports failed and Serve replaces this replica", self.error)

