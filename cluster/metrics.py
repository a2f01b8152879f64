"""Service metrics, exported the Ray Serve way (`ray.serve.metrics`, scraped from Ray's
Prometheus endpoint) and as Prometheus text at `GET /metrics`."""
from __future__ import annotations

from collections import defaultdict

from ray.serve import metrics

LATENCY_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320]


class Metrics:
    def __init__(self) -> None:
        self._requests = metrics.Counter("bagel_requests_total", "requests by task and outcome",
                                         tag_keys=("task", "outcome"))
        self._latency = metrics.Histogram("bagel_request_latency_s", "request latency (s)",
                                          boundaries=LATENCY_BUCKETS, tag_keys=("task",))
        self._gauges = {name: metrics.Gauge(f"bagel_{name}", help_text)
                        for name, help_text in (("queue_depth", "requests in the system"),
                                                ("live_kv_contexts", "KV contexts held by stages"),
                                                ("kv_bytes", "KV cache bytes held by stages"),
                                                ("gpu_memory_bytes", "GPU memory allocated by stages"))}
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.values: dict[str, float] = defaultdict(float)

    def request(self, task: str, outcome: str, latency_s: float) -> None:
        self._requests.inc(tags={"task": task, "outcome": outcome})
        self.counts[(task, outcome)] += 1
        if outcome == "ok":
            self._latency.observe(latency_s, tags={"task": task})
            self.latency_sum[task] += latency_s
            self.latency_count[task] += 1

    def set(self, name: str, value: float) -> None:
        self._gauges[name].set(value)
        self.values[name] = value

    def prometheus_text(self) -> str:
        lines = ["# TYPE bagel_requests_total counter"]
        lines += [f'bagel_requests_total{{task="{t}",outcome="{o}"}} {n}' for (t, o), n in sorted(self.counts.items())]
        lines.append("# TYPE bagel_request_latency_s summary")
        for task in sorted(self.latency_count):
            lines.append(f'bagel_request_latency_s_sum{{task="{task}"}} {self.latency_sum[task]}')
            lines.append(f'bagel_request_latency_s_count{{task="{task}"}} {self.latency_count[task]}')
        for name, value in sorted(self.values.items()):
            lines += [f"# TYPE bagel_{name} gauge", f"bagel_{name} {value}"]
        return "\n".join(lines) + "\n"
