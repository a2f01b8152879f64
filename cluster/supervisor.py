"""`StageSupervisor`: brings the pipeline's stage group up, and keeps it working.

The stage workers are plain Ray actors created by the ingress (one gang, placed together), so
Serve does not restart them: when one dies, every KV cache of the group is lost anyway, and the
supervisor replaces the whole group. Building a group (placing it, loading the weights) and
warming it up (compiling kernels, capturing CUDA graphs) takes a while, so it happens on a
background thread, first when the replica starts (`start`, state `starting`), then after a
failure (state `restarting`); requests are refused with 503 meanwhile and `/health` answers at
once. A build is tried a bounded number of times with exponential backoff, logging each failure;
then the supervisor gives up and says so (`state == "failed"`), so that `/health` reports
`failed` and the ingress's `check_health` raises, and Serve replaces the replica (which builds a
new group).
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

State = Literal["starting", "ok", "restarting", "failed"]


class StageSupervisor:
    def __init__(self, make_group: Callable[[], StageGroup], *, max_tries: int, backoff_s: float,
                 on_replaced: Callable[[StageGroup], None] = lambda group: None,
                 warm_up: Callable[[], None] = lambda: None,
                 sleep: Callable[[float], None] = time.sleep):
        """`on_replaced(group)` puts a new group to use; `warm_up()` then runs on it before the
        state turns `ok` (an exception there fails the attempt like a failed build)."""
        self.make_group, self.max_tries, self.backoff_s = make_group, max_tries, backoff_s
        self.on_replaced, self.warm_up, self.sleep = on_replaced, warm_up, sleep
        self.group: StageGroup | None = None
        self.state: State = "starting"
        self.error: str | None = None  # why the last build gave up
        self.rebuilds = 0  # groups replaced after a failure
        self.building: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Build the first group (and warm it up) in the background."""
        self.building = threading.Thread(target=self._build, args=("building",), name="stage-build", daemon=True)
        self.building.start()

    def stage_failed(self, error: BaseException) -> None:
        """A stage worker died (any thread may call this): rebuild the group in the background,
        once however many requests saw the failure."""
        with self._lock:
            if self.state != "ok":
                return
            self.state = "restarting"
        log.warning("stage worker failed (%s); rebuilding the stage group", describe(error))
        self.building = threading.Thread(target=self._rebuild, name="stage-rebuild", daemon=True)
        self.building.start()

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based)."""
        return min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)

    def _rebuild(self) -> None:
        try:
            self.group.shutdown()
        except Exception as e:  # the group is broken already; its actors are killed either way
            log.info("shutting down the old stage group: %s", describe(e))
        self.rebuilds += 1
        self._build("rebuilding")

    def _build(self, what: str) -> None:
        for attempt in range(1, self.max_tries + 1):
            start = time.monotonic()
            group = None
            try:
                group = self.make_group()
                self.on_replaced(group)
                self.group = group
                self.warm_up()
            except Exception as e:
                error = describe(e)
                log.warning("%s the stage group failed (attempt %d of %d): %s", what, attempt, self.max_tries,
                            error, exc_info=e)
                if group is not None:
                    _shut_down(group)
                if attempt == self.max_tries:
                    break
                delay = self.backoff(attempt)
                log.info("next attempt in %.1f s", delay)
                self.sleep(delay)
                continue
            self.state = "ok"
            log.info("stage group ready after %s in %.1f s (attempt %d of %d)", what, time.monotonic() - start,
                     attempt, self.max_tries)
            return
        done = "rebuilt" if what == "rebuilding" else "built"
        self.error = f"the stage workers could not be {done} ({self.max_tries} attempts); last error: {error}"
        self.state = "failed"
        log.error("%s; giving up: /health reports failed and Serve replaces this replica", self.error)


def _shut_down(group: StageGroup) -> None:
    try:
        group.shutdown()
    except Exception as e:  # its actors are gone already
        log.info("shutting down a stage group that failed to start: %s", describe(e))
