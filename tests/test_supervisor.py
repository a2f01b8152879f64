"""Stage supervision without Ray: the supervisor builds the stage group and warms it up in the
background while `/health` answers `starting` at once; when a stage worker dies it rebuilds the
group, logging each failure through the `ray.serve` logger, backing off exponentially and giving
up after a bounded number of attempts. Then `/health` says `failed` (503), requests get 503 with
Retry-After, and the deployment's `check_health` raises so that Serve replaces the replica.

Stage groups come from an injected factory (fakes that fail on demand); the service and its
HTTP layer are the real ones, on the parity fixture's checkpoint, called through FastAPI's
TestClient.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from bagel_model.stage import split_layers
from cluster.args import AppArgs
from cluster.errors import StageFailed
from cluster.http import create_app
from cluster.orchestrator import Orchestrator
from cluster.service import BagelService
from cluster.supervisor import MAX_BACKOFF_S, StageSupervisor


class FakeGroup:
    """What the service uses of a `StageGroup`, for one stage of two layers."""

    def __init__(self, generation: int):
        self.generation = generation
        self.specs = split_layers(2, 1)
        self.workers = [None]
        self.num_stages = self.num_groups = 1
        self.links = ["gloo"]
        self.shut_down = False

    def broadcast(self, method: str) -> list[dict]:
        assert method == "stats"
        return [{"stage": 0, "layers": [0, 2], "live_contexts": 0, "context_ids": [], "kv_bytes": 0,
                 "latent_states": [], "gpu_memory_bytes": None, "pid": os.getpid(), "busy_s": 0.0}]

    def shutdown(self) -> None:
        self.shut_down = True


class Factory:
    """Builds `FakeGroup`s: the first `good` calls succeed, later ones raise, until `heal()`.
    With `gate`, each call from the `gated_from`-th on waits for it (to look at the states
    between)."""

    def __init__(self, good: int = 1, gate: threading.Event | None = None, gated_from: int = 2):
        self.good, self.gate, self.gated_from, self.calls, self.healed = good, gate, gated_from, 0, False

    def __call__(self) -> FakeGroup:
        self.calls += 1
        if self.gate is not None and self.calls >= self.gated_from:
            assert self.gate.wait(10)
        if self.calls > self.good and not self.healed:
            raise RuntimeError(f"no GPU free for stage 0 (call {self.calls})")
        return FakeGroup(self.calls)

    def heal(self) -> None:
        self.healed = True


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def serve_log() -> Iterator[Records]:
    """What the supervisor logs through Serve's logger (which does not propagate to the root)."""
    logger, handler = logging.getLogger("ray.serve"), Records()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def finished(supervisor: StageSupervisor) -> StageSupervisor:
    """Wait for the supervisor's build (or rebuild) to end."""
    supervisor.building.join(timeout=30)
    assert not supervisor.building.is_alive()
    return supervisor


def started(supervisor: StageSupervisor) -> StageSupervisor:
    supervisor.start()
    return finished(supervisor)


def failed_over(supervisor: StageSupervisor, error: Exception) -> None:
    """Report a dead worker and wait for the rebuild to end."""
    supervisor.stage_failed(error)
    finished(supervisor)


def test_rebuild_gives_up_after_the_bounded_tries_with_exponential_backoff(serve_log):
    factory, waits, replaced = Factory(good=1), [], []
    supervisor = started(StageSupervisor(factory, max_tries=4, backoff_s=0.5, on_replaced=replaced.append,
                                         sleep=waits.append))
    first = supervisor.group
    assert supervisor.state == "ok" and factory.calls == 1 and replaced == [first]
    replaced.clear()

    failed_over(supervisor, RuntimeError("stage 1 died\ntraceback..."))

    assert factory.calls == 1 + 4, "one build, then exactly max_tries rebuild attempts"
    assert waits == [0.5, 1.0, 2.0], "exponential backoff between attempts, none after the last"
    assert supervisor.state == "failed" and replaced == [] and supervisor.group is first and supervisor.rebuilds == 1
    assert first.shut_down, "the broken group's actors are released"
    assert "4 attempts" in supervisor.error and "no GPU free for stage 0 (call 5)" in supervisor.error
    warnings = serve_log.at(logging.WARNING)
    assert warnings[0] == "stage worker failed (RuntimeError: stage 1 died); rebuilding the stage group"
    assert [w.split("(attempt ")[1].split(")")[0] for w in warnings[1:]] == ["1 of 4", "2 of 4", "3 of 4", "4 of 4"]
    assert all(f"(call {k + 2})" in w for k, w in enumerate(warnings[1:])), "each attempt's error is logged"
    [error] = serve_log.at(logging.ERROR)
    assert "giving up" in error and "(call 5)" in error


def test_rebuild_succeeds_after_failed_attempts(serve_log):
    factory, waits, replaced = Factory(good=1), [], []
    supervisor = started(StageSupervisor(factory, max_tries=5, backoff_s=2.0, on_replaced=replaced.append,
                                         sleep=lambda s: (waits.append(s), len(waits) == 2 and factory.heal())))
    failed_over(supervisor, RuntimeError("stage 0 died"))
    assert supervisor.state == "ok" and supervisor.error is None
    assert factory.calls == 1 + 3 and waits == [2.0, 4.0]
    assert replaced[-1] is supervisor.group and supervisor.group.generation == 4
    assert any("ready after rebuilding" in m and "attempt 3 of 5" in m for m in serve_log.at(logging.INFO))
    assert serve_log.at(logging.ERROR) == []


def test_start_builds_and_warms_up_in_the_background_retrying_a_failed_warm_up(serve_log):
    """The first group is built off the caller's thread; the warm-up runs on it after it is put
    to use, and a warm-up that fails fails the attempt (the group is shut down, a new one built)."""
    gate, order, warmups = threading.Event(), [], []
    factory = Factory(good=5, gate=gate, gated_from=1)

    def warm_up():
        warmups.append(order[-1])
        if len(warmups) == 1:
            raise RuntimeError("CUDA graph capture failed")

    supervisor = StageSupervisor(factory, max_tries=3, backoff_s=0.01, on_replaced=order.append, warm_up=warm_up,
                                 sleep=lambda s: None)
    supervisor.start()
    assert supervisor.state == "starting" and supervisor.group is None
    gate.set()
    finished(supervisor)
    assert supervisor.state == "ok" and factory.calls == 2
    assert warmups == order and len(order) == 2 and order[0].shut_down and not order[1].shut_down
    assert supervisor.group is order[1] and supervisor.rebuilds == 0
    assert "building the stage group failed (attempt 1 of 3): RuntimeError: CUDA graph capture failed" in \
        serve_log.at(logging.WARNING)


def test_start_gives_up_after_the_bounded_tries():
    supervisor = started(StageSupervisor(Factory(good=0), max_tries=2, backoff_s=0.01, sleep=lambda s: None))
    assert supervisor.state == "failed" and "could not be built (2 attempts)" in supervisor.error


def test_backoff_doubles_up_to_a_cap():
    supervisor = StageSupervisor(Factory(), max_tries=3, backoff_s=1.5)
    assert [supervisor.backoff(k) for k in (1, 2, 3, 4)] == [1.5, 3.0, 6.0, 12.0]
    assert supervisor.backoff(30) == MAX_BACKOFF_S


def test_many_reports_of_one_failure_rebuild_once():
    gate = threading.Event()
    factory = Factory(good=2, gate=gate)
    supervisor = started(StageSupervisor(factory, max_tries=3, backoff_s=0.01))
    reporters = [threading.Thread(target=supervisor.stage_failed, args=(RuntimeError("dead"),)) for _ in range(8)]
    for t in reporters:
        t.start()
    for t in reporters:
        t.join()
    rebuild = supervisor.building
    supervisor.stage_failed(RuntimeError("dead"))  # while restarting: ignored
    assert supervisor.building is rebuild and supervisor.state == "restarting"
    gate.set()
    rebuild.join(timeout=10)
    assert supervisor.state == "ok" and factory.calls == 2


# -- the service and its HTTP layer ---------------------------------------------------------

RETRY_AFTER_S = 3


@pytest.fixture
def service(checkpoint_dir) -> Iterator[tuple[BagelService, Factory, threading.Event]]:
    gate = threading.Event()
    factory = Factory(good=1, gate=gate)
    args = AppArgs(checkpoint_dir=str(checkpoint_dir), device="cpu", dtype="float32", retry_after_s=RETRY_AFTER_S,
                   stage_rebuild_tries=3, stage_rebuild_backoff_s=0.01)
    service = BagelService(args, encoder=None, decoder=None, make_stages=factory)
    finished(service.supervisor)
    yield service, factory, gate
    gate.set()
    service.pool.shutdown()


def test_health_says_failed_and_check_health_raises_when_rebuilding_gives_up(service, serve_log):
    service, factory, gate = service
    deployment = SimpleNamespace(service=service)
    check_health = Orchestrator.func_or_class.check_health  # the deployment's own method
    generation = {"prompt": "a red fox", "size": "64x64", "num_timesteps": 3}
    with TestClient(create_app(lambda: service)) as client:
        ok = client.get("/health")
        assert ok.status_code == 200 and ok.json()["status"] == "ok" and len(ok.json()["stages"]) == 1
        check_health(deployment)

        service.supervisor.stage_failed(RuntimeError("stage 0 died"))  # rebuilding waits at the gate
        restarting = client.get("/health")
        assert restarting.status_code == 503 and restarting.json()["status"] == "degraded"
        busy = client.post("/v1/images/generations", json=generation)
        assert busy.status_code == 503 and busy.headers["retry-after"] == str(RETRY_AFTER_S)
        assert "restarting" in busy.json()["error"]["message"]
        check_health(deployment)  # restarting is not a reason to replace the replica

        gate.set()
        finished(service.supervisor)
        assert factory.calls == 1 + 3
        failed = client.get("/health")
        assert failed.status_code == 503
        body = failed.json()
        assert body["status"] == "failed" and "3 attempts" in body["error"] and body["model"] == "checkpoint"
        refused = client.post("/v1/images/generations", json=generation)
        assert refused.status_code == 503 and refused.headers["retry-after"] == str(RETRY_AFTER_S)
        assert refused.json()["error"]["type"] == "service_unavailable"
        assert "being replaced" in refused.json()["error"]["message"]
        assert client.get("/metrics").status_code == 200
        with pytest.raises(StageFailed, match="could not be rebuilt"):
            check_health(deployment)
    assert any("giving up" in m for m in serve_log.at(logging.ERROR))


def test_health_answers_starting_at_once_and_requests_get_503_until_the_workers_are_warm(checkpoint_dir):
    gate = threading.Event()
    factory = Factory(good=1, gate=gate, gated_from=1)
    args = AppArgs(checkpoint_dir=str(checkpoint_dir), device="cpu", dtype="float32", retry_after_s=RETRY_AFTER_S)
    service = BagelService(args, encoder=None, decoder=None, make_stages=factory)  # returns while building
    deployment = SimpleNamespace(service=service)
    try:
        with TestClient(create_app(lambda: service)) as client:
            starting = client.get("/health")
            assert starting.status_code == 503 and starting.elapsed.total_seconds() < 1
            assert starting.json()["status"] == "starting" and "building" in starting.json()["detail"]
            Orchestrator.func_or_class.check_health(deployment)  # starting is healthy: not replaced
            refused = client.post("/v1/images/generations", json={"prompt": "a red fox", "size": "64x64"})
            assert refused.status_code == 503 and refused.headers["retry-after"] == str(RETRY_AFTER_S)
            assert "starting" in refused.json()["error"]["message"]
            assert 'bagel_requests_total{outcome="unavailable",' in client.get("/metrics").text
            assert "bagel_ready{" in client.get("/metrics").text
            gate.set()
            finished(service.supervisor)
            ready = client.get("/health")
            assert ready.status_code == 200 and ready.json()["status"] == "ok" and ready.json()["warmup_s"] == {}
    finally:
        gate.set()
        service.pool.shutdown()


def test_a_decoder_failure_leaves_the_stage_group_alone(service):
    """A failed decoder call (Ray's error) becomes a 503 with Retry-After for that request and
    marks the decoder down (image requests refused, /health degraded) without touching the stage
    group; Serve restarts the decoder (tests/test_reliability.py kills a real one)."""
    import asyncio

    import ray

    from cluster.errors import DeploymentFailed
    from cluster.jobs import Job

    service, factory, _ = service

    class DeadDecoder:
        def __getattr__(self, method):
            def fail():
                raise ray.exceptions.ActorDiedError()
            return SimpleNamespace(remote=lambda *args: SimpleNamespace(result=fail))

    service.executor.decoder = DeadDecoder()

    async def request():
        return service._run(Job("r1", 60), lambda task, job: service.executor.decode_latents(None), None)

    with pytest.raises(DeploymentFailed) as failed:
        asyncio.run(request())
    assert failed.value.component == "decoder" and failed.value.retry_after_s == RETRY_AFTER_S
    assert service.supervisor.state == "ok" and factory.calls == 1 and service.supervisor.rebuilds == 0
    with TestClient(create_app(lambda: service)) as client:
        refused = client.post("/v1/images/generations", json={"prompt": "a red fox", "size": "64x64"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == str(RETRY_AFTER_S)
        assert "VAE decoder is restarting" in refused.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "VAE decoder" in health.json()["error"] and len(health.json()["stages"]) == 1
