"""`DeploymentWatch`: whether the encoder and decoder deployments can take work.

They are Serve deployments, so Serve restarts a replica that died; the stage workers are not
touched (only a stage worker's failure rebuilds the stage group). A call in flight on the dead
replica is retried by Serve on the new one (it waits, then succeeds); requests that need the
component and arrive while it has no running replica get a 503 with Retry-After at once instead
of waiting, and `/health` says `degraded`. A watcher thread reads Serve's status of the two
deployments every `poll_s`; a call that failed (`DeploymentFailed`) also marks its component
down until it has a running replica that answers its `ready` method.
"""
from __future__ import annotations

import logging
import threading
import time

from .errors import DeploymentFailed, describe

log = logging.getLogger("ray.serve")

NAMES = {"encoder": "image encoder (ViT + VAE encoder)", "decoder": "VAE decoder"}


class DeploymentWatch:
    def __init__(self, handles: dict[str, object], retry_after_s: int, poll_s: float = 1.0):
        self.handles, self.retry_after_s, self.poll_s = handles, retry_after_s, poll_s
        self.down: dict[str, float] = {}  # component -> when it was seen down (monotonic)
        self.failures = 0  # times a component went down
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._watch, name="deployment-watch", daemon=True).start()

    def failed(self, error: DeploymentFailed) -> None:
        """A call to `error.component` failed (any thread)."""
        self._mark_down(error.component, describe(error.__cause__ or error))

    def check(self, needs: set[str]) -> None:
        """Raise `DeploymentFailed` (503) if a component in `needs` is down."""
        down = sorted(needs & set(self.down))
        if down:
            names = " and the ".join(NAMES[c] for c in down)
            raise DeploymentFailed(f"the {names} is restarting after a failure; retry shortly", down[0],
                                   retry_after_s=self.retry_after_s)

    def status(self) -> str | None:
        """What is down, for /health (None: nothing)."""
        if not self.down:
            return None
        return "; ".join(f"the {NAMES[c]} is restarting" for c in sorted(self.down))

    def _mark_down(self, component: str, why: str) -> None:
        with self._lock:
            if component in self.down:
                return
            self.down[component] = time.monotonic()
            self.failures += 1
        log.warning("the %s is down (%s); Serve restarts it, requests that need it get 503 until it answers",
                    NAMES[component], why)

    def _watch(self) -> None:
        from ray import serve

        while True:
            time.sleep(self.poll_s)
            try:
                applications = serve.status().applications
            except Exception as e:  # the controller is busy or restarting: look again next time
                log.debug("serve.status() failed: %s", describe(e))
                continue
            for component, handle in self.handles.items():
                app = applications.get(handle.deployment_id.app_name)
                deployment = app.deployments.get(handle.deployment_id.name) if app else None
                running = deployment.replica_states.get("RUNNING", 0) if deployment else 0
                if not running:
                    self._mark_down(component, "no running replica")
                elif component in self.down and self._answers(handle):
                    with self._lock:
                        since = self.down.pop(component)
                    log.info("the %s answers again after %.1f s", NAMES[component], time.monotonic() - since)

    def _answers(self, handle) -> bool:
        try:
            return handle.ready.remote().result(timeout_s=10)
        except Exception:  # still starting: next time
            return False
