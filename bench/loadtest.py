"""Load-test harness: closed-loop concurrency sweeps or open-loop Poisson arrivals against a
bagel-serve deployment (HTTP base URL), with a configurable task mix.

    python -m bench.loadtest --url http://127.0.0.1:8000 --concurrency 1,2,4 --requests 12
    python -m bench.loadtest --url http://127.0.0.1:8000 --rates 0.5,1 --duration 60
    python -m bench.loadtest --handle bagel ...        (from a process attached to the Ray cluster)
    (also: `bagel loadtest ...`)

Every request streams (SSE), so the harness sees the time to the first progress event or token
and the queueing time the server reports. Each load level is bounded by a request count and a
time limit. The report (JSON, last stdout line) holds, per level: throughput (requests/min,
images/min, tokens/s), latency p50/p90/p99 per task, time to first event, queueing time, errors
by kind and per-stage busy fractions from /health; charts are written next to it as PNG.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.provenance import write_report as write_json

TASKS = ("t2i", "edit", "understand", "think")
PROMPTS = ["a red fox in the snow", "a small wooden boat on a calm lake", "an old castle under the moon",
           "a bowl of ramen, studio light", "a city street in the rain at night"]


@dataclass
class Sample:
    task: str
    start_s: float
    end_s: float = 0.0
    first_event_s: float | None = None
    queue_s: float | None = None
    status: int = 0
    error: str | None = None
    tokens: int = 0
    images: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Workload:
    mix: dict[str, float]
    size: int = 64
    steps: int = 4
    max_tokens: int = 16
    think_tokens: int = 8
    seed: int = 0
    _image_b64: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.mix) - set(TASKS)
        if unknown or not self.mix:
            raise ValueError(f"task mix must use {TASKS}, got {sorted(self.mix)}")
        x = np.linspace(0, 255, self.size, dtype=np.uint8)
        pixels = np.stack([np.tile(x, (self.size, 1)), np.tile(x[:, None], (1, self.size)),
                           np.full((self.size, self.size), 128, np.uint8)], axis=-1)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        self._image_b64 = base64.b64encode(buf.getvalue()).decode()

    def pick(self, rng: random.Random) -> str:
        tasks = list(self.mix)
        return rng.choices(tasks, weights=[self.mix[t] for t in tasks])[0]

    def request(self, task: str, rng: random.Random) -> tuple[str, dict]:
        prompt = rng.choice(PROMPTS)
        image = {"num_timesteps": self.steps, "seed": rng.randrange(2**31), "stream": True}
        if task == "t2i":
            return "/v1/images/generations", {"prompt": prompt, "size": f"{self.size}x{self.size}", **image}
        if task == "think":
            return "/v1/images/generations", {"prompt": prompt, "size": f"{self.size}x{self.size}", "think": True,
                                              "max_think_tokens": self.think_tokens, **image}
        if task == "edit":
            return "/v1/images/edits", {"prompt": "make it " + rng.choice(["night", "purple", "snowy"]),
                                        "image": self._image_b64, **image}
        url = f"data:image/png;base64,{self._image_b64}"
        return "/v1/chat/completions", {"max_tokens": self.max_tokens, "stream": True, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe this picture."}]}]}


class HttpTarget:
    """Requests over HTTP, streamed (SSE), so the first event and the queueing time are seen."""

    def __init__(self, client: httpx.AsyncClient, workload: Workload):
        self.client, self.workload = client, workload

    async def health(self) -> dict:
        return (await self.client.get("/health")).json()

    async def send(self, task: str, rng: random.Random, t0: float) -> Sample:
        path, body = self.workload.request(task, rng)
        sample = Sample(task, time.perf_counter() - t0)
        try:
            async with self.client.stream("POST", path, json=body) as response:
                sample.status = response.status_code
                if response.status_code != 200:
                    await response.aread()
                    sample.error = f"http_{response.status_code}"
                    return sample
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    _record(sample, json.loads(line[6:]), time.perf_counter() - t0)
        except httpx.HTTPError as e:
            sample.error = type(e).__name__
        finally:
            sample.end_s = time.perf_counter() - t0
        return sample


class HandleTarget:
    """Requests through the application's Ray handle (from inside the Ray cluster); results
    arrive whole, so the first event is the result."""

    def __init__(self, handle, workload: Workload):
        self.handle, self.workload = handle, workload

    async def health(self) -> dict:
        return {**await self.handle.stats.remote(), "model": "(Ray handle)"}

    async def send(self, task: str, rng: random.Random, t0: float) -> Sample:
        from cluster.api import ImageTask, TextTask
        from pipelines.params import EDIT_DEFAULTS, ImageParams, TextParams

        w, sample = self.workload, Sample(task, time.perf_counter() - t0)
        image = base64.b64decode(w._image_b64)
        try:
            if task == "understand":
                out = await self.handle.understand.remote(
                    TextTask([image, "Describe this picture."], TextParams(max_new_tokens=w.max_tokens)))
                sample.tokens = out.completion_tokens
            else:
                if task == "edit":
                    items, base = [image, "make it night"], EDIT_DEFAULTS
                else:
                    items, base = [rng.choice(PROMPTS)], ImageParams(height=w.size, width=w.size)
                params = ImageParams(**{**base.__dict__, "num_timesteps": w.steps})
                await self.handle.generate.remote(ImageTask(items, params, task == "think",
                                                            TextParams(max_new_tokens=w.think_tokens),
                                                            rng.randrange(2**31)))
                sample.images = 1
            sample.status = 200
        except Exception as e:  # the error kind is what the report counts
            sample.error = type(e).__name__
        sample.end_s = time.perf_counter() - t0
        sample.first_event_s = sample.end_s - sample.start_s if sample.ok else None
        return sample


def _record(sample: Sample, event: dict, now_s: float) -> None:
    """Update a sample from one streamed event."""
    if sample.first_event_s is None and event.get("type") != "started":
        sample.first_event_s = now_s - sample.start_s
    if "error" in event:
        sample.error = f"stream_{event.get('status', 'error')}"
    elif event.get("type") == "started":
        sample.queue_s = event.get("queue_s")
    elif str(event.get("type")).endswith(".completed"):  # image_generation.completed / image_edit.completed
        sample.images += 1
    elif event.get("object") == "chat.completion.chunk":
        sample.tokens += int(bool(event["choices"][0]["delta"].get("content")))


async def closed_loop(target, workload: Workload, concurrency: int, requests: int, duration_s: float,
                      rng: random.Random, progress) -> tuple[list[Sample], float]:
    t0, samples, issued = time.perf_counter(), [], 0

    async def worker():
        nonlocal issued
        while issued < requests and time.perf_counter() - t0 < duration_s:
            issued += 1
            samples.append(await target.send(workload.pick(rng), rng, t0))
            progress.update(1)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - t0


async def open_loop(target, workload: Workload, rate: float, requests: int, duration_s: float,
                    rng: random.Random, progress) -> tuple[list[Sample], float]:
    t0, tasks, at = time.perf_counter(), [], 0.0
    for _ in range(requests):
        at += rng.expovariate(rate)
        if at > duration_s:
            break
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        task = asyncio.create_task(target.send(workload.pick(rng), rng, t0))
        task.add_done_callback(lambda _: progress.update(1))
        tasks.append(task)
    samples = list(await asyncio.gather(*tasks))
    return samples, time.perf_counter() - t0


def summarize(samples: list[Sample], elapsed_s: float, busy: list[float] | None) -> dict:
    ok = [s for s in samples if s.ok]
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[s.error] = errors.get(s.error, 0) + 1
    per_task = {}
    for task in sorted({s.task for s in samples}):
        done = [s for s in ok if s.task == task]
        per_task[task] = {
            "requests": sum(s.task == task for s in samples), "ok": len(done),
            "latency_s": _percentiles([s.end_s - s.start_s for s in done]),
            "first_event_s": _percentiles([s.first_event_s for s in done if s.first_event_s is not None]),
            "queue_s": _percentiles([s.queue_s for s in done if s.queue_s is not None]),
        }
    return {
        "requests": len(samples), "ok": len(ok), "elapsed_s": elapsed_s, "errors": errors,
        "requests_per_min": 60 * len(ok) / elapsed_s if elapsed_s else 0.0,
        "images_per_min": 60 * sum(s.images for s in ok) / elapsed_s if elapsed_s else 0.0,
        "tokens_per_s": sum(s.tokens for s in ok) / elapsed_s if elapsed_s else 0.0,
        "latency_s": _percentiles([s.end_s - s.start_s for s in ok]),
        "per_task": per_task, "stage_busy_fraction": busy,
    }


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    return {"n": len(values), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "max": float(a.max())}


async def stage_busy(target) -> list[float] | None:
    try:
        return [s.get("busy_s", 0.0) for s in (await target.health()).get("stages", [])]
    except Exception:  # an unreachable or degraded service: no busy figures for this level
        return None


async def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    workload = Workload(parse_mix(args.mix), args.size, args.steps, args.max_tokens, args.think_tokens)
    rng = random.Random(args.seed)
    levels = ([("concurrency", c) for c in parse_list(args.concurrency, int)] if not args.rates
              else [("rate", r) for r in parse_list(args.rates, float)])
    report = {"benchmark": "loadtest", "url": args.url if not args.handle else f"handle:{args.handle}",
              "mode": "open" if args.rates else "closed",
              "settings": {"mix": workload.mix, "size": args.size, "steps": args.steps,
                           "max_tokens": args.max_tokens, "requests_per_level": args.requests,
                           "duration_s_per_level": args.duration, "seed": args.seed}, "levels": []}
    async with _target(args, workload) as target:
        health = await target.health()
        report["server"] = {k: health.get(k) for k in ("model", "demo", "notice")}
        report["server"]["num_stages"] = len(health.get("stages", []))
        with tqdm(total=args.requests * len(levels), desc="requests", unit="req", disable=args.quiet) as progress:
            for kind, value in levels:
                busy0, t_busy = await stage_busy(target), time.perf_counter()
                loop = closed_loop if kind == "concurrency" else open_loop
                samples, elapsed = await loop(target, workload, value, args.requests, args.duration, rng, progress)
                busy1, dt = await stage_busy(target), time.perf_counter() - t_busy
                busy = [(b - a) / dt for a, b in zip(busy0, busy1)] if busy0 and busy1 else None
                report["levels"].append({kind: value, **summarize(samples, elapsed, busy),
                                         "samples": [asdict(s) for s in samples]})
    return report


@contextlib.asynccontextmanager
async def _target(args: argparse.Namespace, workload: Workload):
    if args.handle:
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(address="auto")
        yield HandleTarget(serve.get_app_handle(args.handle), workload)
        return
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, headers=headers, limits=limits) as client:
        yield HttpTarget(client, workload)


def write_report(report: dict, out: Path) -> list[Path]:
    """The JSON report and its charts (latency vs load, throughput vs load; with matplotlib, the
    `bench` extra)."""
    write_json(report, out, "loadtest.json")
    try:
        import matplotlib
    except ImportError:
        print("charts skipped: matplotlib is not installed (pip install 'bagel-serve[bench]')", file=sys.stderr)
        return [out / "loadtest.json"]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "concurrency" if report["mode"] == "closed" else "rate"
    x = [level[key] for level in report["levels"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for q in ("p50", "p90", "p99"):
        ax1.plot(x, [level["latency_s"].get(q, np.nan) for level in report["levels"]], marker="o", label=q)
    ax1.set(xlabel=key, ylabel="latency (s)", title="latency vs load")
    ax1.legend()
    ax2.plot(x, [level["requests_per_min"] for level in report["levels"]], marker="o", label="requests/min")
    ax2.plot(x, [level["images_per_min"] for level in report["levels"]], marker="s", label="images/min")
    ax2.set(xlabel=key, ylabel="per minute", title="throughput vs load")
    ax2.legend()
    fig.suptitle(f"bagel-serve load test ({report['server'].get('model')}, {report['server'].get('num_stages')} stage(s))")
    fig.tight_layout()
    chart = out / "loadtest.png"
    fig.savefig(chart, dpi=100)
    plt.close(fig)
    return [out / "loadtest.json", chart]


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        mix[name.strip()] = float(weight or 1)
    return mix


def parse_list(text: str, kind):
    return [kind(v) for v in text.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the service")
    p.add_argument("--handle", default=None, metavar="APP",
                   help="instead of HTTP: the Serve application's Ray handle (run inside the Ray cluster)")
    p.add_argument("--concurrency", default="1,2,4", help="closed loop: comma-separated concurrency levels")
    p.add_argument("--rates", default=None, help="open loop instead: comma-separated arrival rates (requests/s)")
    p.add_argument("--requests", type=int, default=12, help="requests per level (upper bound)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds per level (upper bound)")
    p.add_argument("--mix", default="t2i=3,edit=1,understand=2,think=1", help="task weights")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--steps", type=int, default=4, help="num_timesteps of image requests")
    p.add_argument("--max-tokens", type=int, default=16, help="answer length of understand requests")
    p.add_argument("--think-tokens", type=int, default=8, help="thought length of think requests")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/loadtest", help="report folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    report = asyncio.run(run(args))
    write_report(report, Path(args.out))
    print(json.dumps({k: v for k, v in report.items()} | {"levels": [
        {k: v for k, v in level.items() if k != "samples"} for level in report["levels"]]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
