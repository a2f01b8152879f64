"""The replica's metrics, in a `prometheus_client` registry of its own, served at `GET /metrics`.

Requests are counted by task and outcome, the refused ones too (429 overloaded, 503 while
starting or restarting); latency, queueing time, time to the first event, the time per phase
(cluster/phases.py) and the requests per denoising forward (step batching) are histograms;
queue depth, KV-cache and GPU memory figures are gauges, read from the service when scraped. Ray Serve's own metrics (requests, errors and
latency per deployment and replica) stay on Ray's Prometheus endpoint; behind several ingress
replicas `GET /metrics` describes the replica that answered (its `replica` label says which).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
SHORT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# gauges read from the service at scrape time: name -> help
LIVE_GAUGES = {
    "requests_in_system": "requests admitted and not finished (running or queued)",
    "requests_running": "requests on a worker thread",
    "kv_reserved_bytes": "KV-cache bytes reserved by admitted requests (per stage)",
    "ready": "1 while /health says ok",
    "stage_group_rebuilds": "stage groups replaced after a stage worker failed",
    "deployment_failures": "encoder or decoder failures seen (Serve restarts those)",
}
# the prefix cache's figures (pipelines/prefix_cache.py: PrefixCache.stats), read at scrape time
PREFIX_CACHE_STATS = {
    "hits": "prompt contexts that reused a cached prefix (since the stage workers were built)",
    "misses": "prompt contexts that found no cached prefix",
    "hit_tokens": "prompt tokens reused from cached prefixes",
    "evictions": "cached prefixes evicted (least recently used first)",
    "entries": "cached prefixes held",
    "bytes": "KV bytes per stage of the cached prefixes",
    "budget_bytes": "the prefix cache's budget per stage (0: off)",
}
LIVE_GAUGES.update({f"prefix_cache_{name}": text for name, text in PREFIX_CACHE_STATS.items()})
# gauges refreshed from the stages' stats: name -> help
STAGE_GAUGES = {
    "live_kv_contexts": "KV contexts held by the stages",
    "kv_bytes": "KV-cache bytes held by the stages for requests",
    "gpu_memory_bytes": "GPU memory allocated by the stages",
}


class Metrics:
    def __init__(self, replica: str, live: Mapping[str, Callable[[], float]]):
        """`live`: a reader for each of `LIVE_GAUGES`."""
        self.registry = CollectorRegistry()
        labels = {"registry": self.registry}
        self.requests = Counter("bagel_requests", "requests by task and outcome (ok, invalid, overloaded, "
                                "unavailable, cancelled, timeout, error)", ["replica", "task", "outcome"], **labels)
        self.latency = Histogram("bagel_request_latency_seconds", "latency of successful requests, queueing included",
                                 ["replica", "task"], buckets=LATENCY_BUCKETS, **labels)
        self.queue = Histogram("bagel_queue_seconds", "time from admission to the start of the work",
                               ["replica", "task"], buckets=SHORT_BUCKETS, **labels)
        self.first_event = Histogram("bagel_time_to_first_event_seconds", "time to the first progress step or "
                                     "token", ["replica", "task"], buckets=SHORT_BUCKETS, **labels)
        self.phase = Histogram("bagel_phase_seconds", "time per phase of successful requests (cluster/phases.py)",
                               ["replica", "task", "phase"], buckets=SHORT_BUCKETS, **labels)
        self.requests_per_forward = Histogram(
            "bagel_requests_per_forward", "requests whose denoising steps shared a forward (pipelines/batching.py)",
            ["replica"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), **labels).labels(replica)
        self.stage = {name: Gauge(f"bagel_{name}", text, ["replica"], **labels).labels(replica)
                      for name, text in STAGE_GAUGES.items()}
        for name, text in LIVE_GAUGES.items():
            Gauge(f"bagel_{name}", text, ["replica"], **labels).labels(replica).set_function(live[name])
        self.replica = replica

    def refused(self, task: str, outcome: str) -> None:
        """A request refused before it was admitted (429, 503, 400)."""
        self.requests.labels(self.replica, task, outcome).inc()

    def finished(self, task: str, outcome: str, latency_s: float, phases: Mapping[str, float],
                 first_event_s: float | None) -> None:
        self.requests.labels(self.replica, task, outcome).inc()
        if "queue" in phases:
            self.queue.labels(self.replica, task).observe(phases["queue"])
        if first_event_s is not None:
            self.first_event.labels(self.replica, task).observe(first_event_s)
        if outcome == "ok":
            self.latency.labels(self.replica, task).observe(latency_s)
            for phase, seconds in phases.items():
                self.phase.labels(self.replica, task, phase).observe(seconds)

    def forward(self, requests: int) -> None:
        """A denoising forward carried the steps of this many requests."""
        self.requests_per_forward.observe(requests)

    def stage_stats(self, stages: list[dict]) -> None:
        self.stage["live_kv_contexts"].set(sum(s["live_contexts"] for s in stages))
        self.stage["kv_bytes"].set(sum(s["kv_bytes"] for s in stages))
        self.stage["gpu_memory_bytes"].set(sum(s["gpu_memory_bytes"] or 0 for s in stages))

    def text(self) -> bytes:
        return generate_latest(self.registry)
