"""Hostile input against the real Serve app: hand-written attacks (tests/hostile.py), a
schema-driven fuzzer (schemathesis, from the app's own /openapi.json), `/health` timed while huge
uploads arrive, the same checks for Ray-handle callers, and the README's handle example run from
another process.

What is guaranteed, and checked here: every request gets an answer within its time limit; every
input error is a 4xx in OpenAI's error shape naming the field, never a 5xx; no error message
shows internals; the ingress's memory stays within a stated bound; nothing is left allocated
afterwards (no KV context, no queued request, no reserved image memory).

The app serves a demo-style model of 64x64 images (random weights) so that the requests the
fuzzer gets right are cheap, with small limits (2 MiB uploads, 64 new tokens, 8 steps).
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bagel_model.demo import demo_config, demo_tokenizer, write_checkpoint
from bagel_model.transforms import ResizeRule

from . import hostile
from .service_app import REPO_ROOT, png_bytes, running_app

KEY = "hostile-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_IMAGE_PIXELS = 40_000_000
MAX_UPLOAD_BYTES = 2 * 2**20
IMAGE_MEMORY_BYTES = 512 * 2**20
LIMITS = {"max_upload_bytes": MAX_UPLOAD_BYTES, "max_image_pixels": MAX_IMAGE_PIXELS, "max_new_tokens": 64,
          "max_n": 2, "max_num_timesteps": 8}
# The ingress may grow by the decoded-image budget plus allocator and parsing slack, no more.
RSS_BOUND_BYTES = IMAGE_MEMORY_BYTES + 384 * 2**20
HANG_S = 60  # no answer within this long is a hang (the app's request deadline is 30 s)
FUZZ_EXAMPLES = int(os.environ.get("BAGEL_FUZZ_EXAMPLES", 1000))
FUZZ_BUDGET_S = float(os.environ.get("BAGEL_FUZZ_BUDGET_S", 75))
LEAK = re.compile("|".join(re.escape(w) for w in hostile.LEAKS))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    tokenizer = demo_tokenizer()
    config = dataclasses.replace(demo_config(), max_latent_size=4, vae_transform=ResizeRule(64, 32, 16),
                                 vit_transform=ResizeRule(56, 28, 14))
    return write_checkpoint(tmp_path_factory.mktemp("tiny64"), config, tokenizer)


@dataclasses.dataclass
class App:
    client: httpx.Client
    handle: object
    pid: int  # the ingress replica's process

    def health(self) -> dict:
        return self.client.get("/health").json()


@pytest.fixture(scope="module")
def app(ray_url, tiny_checkpoint):
    args = {"checkpoint_dir": str(tiny_checkpoint), "num_stages": 1, "device": "cpu", "dtype": "float32",
            "api_key": KEY, "max_concurrent_requests": 2, "max_queued_requests": 4, "request_timeout_s": 30,
            "retry_after_s": 1, "image_memory_bytes": IMAGE_MEMORY_BYTES, "limits": LIMITS}
    with running_app(ray_url, args) as handle, httpx.Client(base_url=ray_url, timeout=HANG_S, headers=AUTH) as client:
        yield App(client, handle, ingress_pid())


@pytest.fixture
def shown(capsys):
    """Print to the terminal even when pytest captures output: CI logs show the counts."""
    def show(text: str) -> None:
        with capsys.disabled():
            print(text, flush=True)
    return show


def ingress_pid() -> int:
    import ray

    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::bagel#Orchestrator#")]
    return ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda self: os.getpid()))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class RssWatch:
    """The peak resident memory of a process, sampled every 20 ms on a thread."""

    def __init__(self, pid: int):
        self.pid, self.start = pid, rss_bytes(pid)
        self.peak, self._stop = self.start, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def wait_idle(app: App, timeout_s: float = 30) -> dict:
    """The health document once nothing is in flight; fails if something stays allocated."""
    deadline = time.monotonic() + timeout_s
    while True:
        doc = app.health()
        if doc.get("status") == "ok" and doc["requests_in_system"] == 0 and doc["image_reserved_bytes"] == 0 \
                and doc["kv_reserved_bytes"] == 0 and all(s["live_contexts"] == 0 and s["kv_bytes"] == 0
                                                          for s in doc["stages"]):
            return doc
        if time.monotonic() > deadline:
            pytest.fail(f"the service did not become idle: {doc}")
        time.sleep(0.1)


def error_problems(content_type: str, content: bytes) -> list[str]:
    """What is wrong with an error response: its shape, its content type, leaked internals."""
    try:
        body = json.loads(content)
    except ValueError:
        return [f"not JSON: {content[:100]!r}"]
    error = body.get("error") if isinstance(body, dict) else None
    if set(body) != {"error"} or not isinstance(error, dict) or not isinstance(error.get("message"), str) \
            or not isinstance(error.get("type"), str):
        return [f"not the error shape: {body}"]
    problems = [] if content_type.startswith("application/json") else [f"content type {content_type}"]
    if LEAK.search(error["message"]):
        problems.append(f"leaks internals: {error['message']!r}")
    return problems


def raw_post(base_url: str, path: str, body: bytes, headers: dict) -> httpx.Response:
    url = httpx.URL(base_url)
    connection = http.client.HTTPConnection(url.host, url.port, timeout=HANG_S)
    try:
        connection.request("POST", path, body, headers)
        answer = connection.getresponse()
        return httpx.Response(answer.status, headers=answer.getheaders(), content=answer.read())
    finally:
        connection.close()


def test_hostile_requests_get_their_documented_answers(app, shown):
    limits = dict(max_image_pixels=MAX_IMAGE_PIXELS, max_upload_bytes=MAX_UPLOAD_BYTES,
                  max_body_bytes=4 * (MAX_UPLOAD_BYTES * 4 // 3 + 4) + 2**20)
    wrong, statuses = [], Counter()
    with RssWatch(app.pid) as rss:
        for case in hostile.cases(**limits):
            headers = {**(AUTH if case.auth else {}), **case.request.get("headers", {})}
            if case.raw:
                r = raw_post(str(app.client.base_url), case.path, case.request["content"], headers)
            else:
                r = httpx.post(str(app.client.base_url.join(case.path)), **{**case.request, "headers": headers},
                               timeout=HANG_S)
            statuses[r.status_code] += 1
            problems = [] if r.status_code == case.status else [f"status {r.status_code}, expected {case.status}"]
            if r.status_code >= 400:
                problems += error_problems(r.headers.get("content-type", ""), r.content)
                message = r.json().get("error", {}).get("message", "") if not problems else r.text
                problems += [f"message lacks {w!r}" for w in case.words if w.lower() not in message.lower()]
            if problems:
                wrong.append(f"{case.name}: {'; '.join(problems)} -- {r.text[:200]}")
    shown(f"\nhostile cases: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}, "
          f"ingress RSS +{rss.growth / 2**20:.0f} MiB at peak")
    assert not wrong, "\n".join(wrong)
    assert rss.growth < RSS_BOUND_BYTES, f"ingress RSS grew by {rss.growth / 2**20:.0f} MiB"
    wait_idle(app)


def test_schema_fuzzer_finds_no_5xx_no_hang_no_leak(app, shown):
    """schemathesis generates requests from /openapi.json, valid ones (positive) and ones that
    break the schema (negative), for every operation; bounded by FUZZ_EXAMPLES and FUZZ_BUDGET_S."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_dict(app.client.get("/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {
        "POST /v1/images/generations", "POST /v1/images/edits", "POST /v1/chat/completions", "GET /health"}
    cases = st.one_of([o.as_strategy(mode) for o in operations for mode in schemathesis.GenerationMode])
    counts: dict[str, Counter] = defaultdict(Counter)
    failures: list[str] = []
    start = time.monotonic()
    session = requests.Session()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases)
    def fuzz(case) -> None:
        if time.monotonic() - start > FUZZ_BUDGET_S:
            return
        name = f"{case.operation.method.upper()} {case.operation.path}"
        try:
            response = case.call(base_url=str(app.client.base_url), session=session, headers=AUTH, timeout=HANG_S)
        except requests.Timeout:
            counts[name]["hang"] += 1
            failures.append(f"{name}: no answer within {HANG_S} s")
            return
        counts[name][response.status_code] += 1
        content_type = next((v[0] for k, v in response.headers.items() if k.lower() == "content-type"), "")
        if response.status_code >= 500 or (response.status_code >= 400 and error_problems(content_type,
                                                                                          response.content)):
            failures.append(f"{name} -> {response.status_code} {response.text[:200]} for {case.body!r:.200}")

    with RssWatch(app.pid) as rss:
        fuzz()
    elapsed = time.monotonic() - start
    total = sum(sum(c.values()) for c in counts.values())
    shown(f"\nschemathesis: {total} requests in {elapsed:.0f} s, ingress RSS +{rss.growth / 2**20:.0f} MiB at peak")
    for name, c in sorted(counts.items()):
        shown(f"  {name}: {dict(sorted(c.items(), key=str))}")
    fives = sum(n for c in counts.values() for s, n in c.items() if isinstance(s, int) and s >= 500)
    hangs = sum(c["hang"] for c in counts.values())
    shown(f"  5xx: {fives}, hangs: {hangs}, bad error bodies: {len(failures) - fives - hangs}")
    assert not failures, "\n".join(failures[:20])
    assert total >= 100, f"only {total} requests were sent"
    assert rss.growth < RSS_BOUND_BYTES, f"ingress RSS grew by {rss.growth / 2**20:.0f} MiB"
    doc = wait_idle(app)
    shown(f"  afterwards: {doc['requests_in_system']} requests in the system, "
          f"{sum(s['live_contexts'] for s in doc['stages'])} live KV contexts")


def test_health_stays_fast_during_huge_uploads(app, shown):
    """A 36 MP edit (allowed: decoded on its worker thread) and a chat request with 20 such
    images (refused from the count, before any decode) arrive while /health is polled."""
    big = hostile.png(6000, 6000, "RGB")
    latencies, stop = [], threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=str(app.client.base_url), timeout=10) as client:
            while not stop.is_set():
                t = time.perf_counter()
                assert client.get("/health").status_code == 200
                latencies.append(time.perf_counter() - t)
                time.sleep(0.01)

    answers = {}

    def send(name: str, path: str, body: dict) -> None:
        answers[name] = app.client.post(path, json=body)

    edit = {"prompt": "make it blue", "image": hostile.b64(big), "num_timesteps": 4}
    chat = hostile.chat(hostile.with_images(*[big] * 20))
    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    baseline = len(latencies)
    with RssWatch(app.pid) as rss:
        senders = [threading.Thread(target=send, args=a) for a in
                   (("edit", hostile.EDIT, edit), ("chat", hostile.CHAT, chat))]
        for t in senders:
            t.start()
        for t in senders:
            t.join(timeout=HANG_S)
    time.sleep(0.3)
    stop.set()
    poller.join()
    during = latencies[baseline:]
    shown(f"\n/health during the uploads: {len(during)} calls, max {max(during) * 1000:.0f} ms, "
          f"median {sorted(during)[len(during) // 2] * 1000:.0f} ms; ingress RSS +{rss.growth / 2**20:.0f} MiB")
    assert answers["edit"].status_code == 200, answers["edit"].text[:300]
    assert answers["chat"].status_code == 400 and "at most 4 images" in answers["chat"].text
    assert len(during) >= 10
    assert max(during) < 0.1, f"/health took {max(during) * 1000:.0f} ms"
    assert rss.growth < 36_000_000 * 8 + 128 * 2**20, f"ingress RSS grew by {rss.growth / 2**20:.0f} MiB"
    wait_idle(app)


def test_handle_callers_get_the_same_checks(app):
    from bagel_model.errors import InvalidRequest
    from bagel_model.transforms import InvalidImage
    from cluster.api import ImageTask, TextTask
    from pipelines.params import ImageParams, TextParams

    with pytest.raises(InvalidRequest, match="surrogate"):
        app.handle.understand.remote(TextTask(["x \ud800 y"], TextParams(max_new_tokens=2))).result(timeout_s=60)
    with pytest.raises(InvalidImage, match=str(MAX_IMAGE_PIXELS)):
        app.handle.generate.remote(ImageTask([hostile.png_header_only(10**5, 10**5), "blue"],
                                             ImageParams(num_timesteps=2))).result(timeout_s=60)
    with pytest.raises(InvalidImage, match="could not be decoded"):
        app.handle.generate.remote(ImageTask([hostile.png(64, 64, "RGB", truncate=70), "blue"],
                                             ImageParams(num_timesteps=2))).result(timeout_s=60)
    with pytest.raises(InvalidRequest, match="at most 4 images"):
        app.handle.understand.remote(TextTask([Image.new("RGB", (8, 8))] * 5 + ["what?"],
                                              TextParams(max_new_tokens=2))).result(timeout_s=60)
    out = app.handle.understand.remote(TextTask([png_bytes(Image.new("RGB", (40, 40))), "what?"],
                                                TextParams(max_new_tokens=2))).result(timeout_s=60)
    assert out.completion_tokens >= 1
    wait_idle(app)


def readme_handle_example() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("Python callers"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_handle_example_runs_from_another_process(app, tmp_path):
    """The README's example, as written, in a fresh Python process attached to the test's Ray
    cluster through RAY_ADDRESS (the README says `auto`; the test names its own cluster)."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", readme_handle_example()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(tmp_path / "fox.png") as image:
        assert image.size == (64, 64)
    wait_idle(app)
