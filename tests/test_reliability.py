"""The service under load, faults and bad input (CPU, the parity fixture's model, 2 stages).

One app with small limits: 2 requests at once, 2 queued, an 8 s deadline, an API key and a
KV-cache budget that admits about two requests at a time.
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench import loadtest

from .service_app import png_bytes, running_app, sse_events

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CAPACITY = 4  # max_concurrent_requests + max_queued_requests


@pytest.fixture(scope="module")
def checkpoint_copy(checkpoint_dir, tmp_path_factory) -> Path:
    """The fixture checkpoint in a folder of the tests' own, whose weights a test may hide."""
    copy = Path(shutil.copytree(checkpoint_dir, tmp_path_factory.mktemp("reliability") / checkpoint_dir.name))
    copy.chmod(0o755)  # the fixture is read-only
    return copy


@pytest.fixture(scope="module")
def app(ray_url, checkpoint_copy):
    args = {"checkpoint_dir": str(checkpoint_copy), "num_stages": 2, "device": "cpu", "dtype": "float32",
            "max_concurrent_requests": 2, "max_queued_requests": 2, "request_timeout_s": 8,
            "api_key": KEY, "kv_cache_bytes": 250_000, "retry_after_s": 1, "sse_keepalive_s": 0.3,
            "stage_rebuild_tries": 2, "stage_rebuild_backoff_s": 0.2,
            "limits": {"max_num_timesteps": 2000, "max_image_pixels": 4_000_000}}
    with running_app(ray_url, args), httpx.Client(base_url=ray_url, timeout=60, headers=AUTH) as client:
        yield client


def health(client) -> dict:
    return client.get("/health").json()


def wait_idle(client, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get("/health")
        doc = r.json()
        if r.status_code == 200 and doc["requests_in_system"] == 0 and all(
                s["live_contexts"] == 0 and s["kv_bytes"] == 0 and not s["latent_states"]
                for s in doc["stages"]):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the service did not become idle: {doc}")
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def idle_after(app):
    yield
    wait_idle(app, timeout_s=30)


def t2i(steps: int = 4, **extra) -> dict:
    return {"prompt": "a red fox", "size": "64x64", "num_timesteps": steps, "seed": 1, **extra}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_api_key_is_required(app):
    r = httpx.post(str(app.base_url.join("/v1/images/generations")), json=t2i())
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    wrong = httpx.get(str(app.base_url.join("/v1/models")), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert app.get("/v1/models").status_code == 200


def requests_counted(client, outcome: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines()
               if line.startswith(f'bagel_requests_total{{outcome="{outcome}",'))


def test_overload_gets_429_never_500_or_a_hang(app):
    statuses, headers = [], []
    overloaded_before = requests_counted(app, "overloaded")

    def send():
        r = app.post("/v1/images/generations", json=t2i(steps=40))
        statuses.append(r.status_code)
        headers.append(r.headers.get("retry-after"))

    threads = [threading.Thread(target=send) for _ in range(2 * CAPACITY)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert len(statuses) == 2 * CAPACITY
    assert set(statuses) <= {200, 429, 503, 504}, statuses  # 504: queued past the 8 s deadline on a busy machine
    assert statuses.count(429) >= 1 and statuses.count(200) >= 2, statuses
    assert all(h is not None for s, h in zip(statuses, headers) if s == 429)
    assert time.monotonic() - start < 120
    assert requests_counted(app, "overloaded") - overloaded_before == statuses.count(429), "429s are counted"


def test_a_queued_stream_gets_keep_alives_until_it_starts(app):
    """Two long requests fill the workers; a streamed one waits in the queue, and its stream
    carries `: keep-alive` comments (every sse_keepalive_s = 0.3 s) until its work starts."""
    stop = threading.Event()

    def long_request():
        with app.stream("POST", "/v1/images/generations", json=t2i(steps=1000, stream=True)) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    runners = [threading.Thread(target=long_request) for _ in range(2)]
    for runner in runners:
        runner.start()
    deadline = time.monotonic() + 10
    while health(app)["requests_in_system"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        with app.stream("POST", "/v1/images/generations", json=t2i(steps=3, stream=True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            before_start = []
            for line in lines:
                if line.startswith("data: "):
                    break
                before_start.append(line)
                if before_start.count(": keep-alive") == 3:
                    stop.set()  # let the long requests go
            assert before_start.count(": keep-alive") >= 3, before_start
            assert json.loads(line[len("data: "):])["type"] == "started"
            rest = list(sse_events(lines))
            assert rest[-1] == "[DONE]" and rest[-2]["type"] == "image_generation.completed"
    finally:
        stop.set()
        for runner in runners:
            runner.join(timeout=30)


def test_kv_budget_queues_requests_instead_of_failing(app):
    """The budget fits one such edit at a time: the second waits for room, then succeeds."""
    png = base64.b64encode(png_bytes(Image.new("RGB", (64, 64), (200, 30, 30)))).decode()
    body = {"prompt": "make it blue", "image": png, "num_timesteps": 60, "stream": True}
    queue_s = []

    def send():
        with app.stream("POST", "/v1/images/edits", json=body) as r:
            assert r.status_code == 200
            events = [e for e in sse_events(r.iter_lines()) if isinstance(e, dict)]
            queue_s.append(next(e["queue_s"] for e in events if e.get("type") == "started"))
            assert events[-1].get("type") == "image_edit.completed", events[-1]

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(queue_s) == 2
    assert max(queue_s) > 0.2, f"both edits started at once although their caches do not fit: {queue_s}"


def test_request_larger_than_the_kv_budget_is_refused(app):
    chat = {"max_tokens": 2, "messages": [{"role": "user", "content": "a " * 3000}]}
    r = app.post("/v1/chat/completions", json=chat)
    assert r.status_code == 400 and "KV cache" in r.json()["error"]["message"], r.text


def test_deadline_gives_504(app):
    r = app.post("/v1/images/generations", json=t2i(steps=1000))
    assert r.status_code == 504, r.text
    assert "longer than" in r.json()["error"]["message"]


def test_disconnect_mid_generation_frees_the_caches(app):
    with app.stream("POST", "/v1/images/generations", json=t2i(steps=1000, stream=True)) as r:
        events = sse_events(r.iter_lines())  # kept referenced: dropping it would close the stream here
        while not (isinstance(event := next(events), dict) and event.get("type") == "progress"):
            pass
        assert any(s["live_contexts"] > 0 for s in health(app)["stages"]), "the request holds no cache"
    start = time.monotonic()
    wait_idle(app, timeout_s=5)
    assert time.monotonic() - start < 5
    assert 'bagel_requests_total{outcome="cancelled",' in app.get("/metrics").text


def test_client_timeout_on_a_plain_request_stops_the_work(app):
    with pytest.raises(httpx.ReadTimeout):
        app.post("/v1/images/generations", json=t2i(steps=1000), timeout=1.5)
    wait_idle(app, timeout_s=5)


def test_killed_stage_worker_fails_the_request_cleanly_and_recovers(app):
    pid = health(app)["stages"][1]["pid"]
    result = {}

    def send():
        result["response"] = app.post("/v1/images/generations", json=t2i(steps=1000))

    thread = threading.Thread(target=send)
    thread.start()
    deadline = time.monotonic() + 10
    while not any(s["live_contexts"] for s in health(app)["stages"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    r = result["response"]
    assert r.status_code == 503 and "worker failed" in r.json()["error"]["message"], r.text
    assert r.headers["retry-after"] == "1", "in-flight requests of a dead worker are told when to retry"
    statuses, deadline = [], time.monotonic() + 90
    while time.monotonic() < deadline:
        h = app.get("/health")
        statuses.append(h.status_code)
        if h.status_code == 200:
            break
        time.sleep(0.5)
    assert statuses[-1] == 200 and health(app)["stages"][1]["pid"] != pid
    assert app.post("/v1/images/generations", json=t2i()).status_code == 200


def replica_pid(deployment: str) -> int:
    """The process id of the deployment's live replica (Serve names replica actors app#deployment#id)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if f"#bagel#{deployment}#" in a["name"] or a["name"].startswith(f"SERVE_REPLICA::bagel#{deployment}#")]
    pids = []
    for name in names:
        try:
            pids.append(ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda self: os.getpid()),
                                timeout=10))
        except Exception:  # a dead replica's name lingers until the controller removes it
            pass
    [pid] = pids
    return pid


def metric(client, name: str) -> float:
    """The value of a metric labelled only by replica, from /metrics."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_killed_decoder_restarts_alone_and_refuses_only_what_needs_it(app):
    """Kill the VAE decoder under load: Serve restarts it; meanwhile image requests get 503 with
    Retry-After (those in flight wait for the new decoder instead, Serve retries them there, or
    reach the app's 8 s deadline),
    text requests go on, and the stage workers are untouched (same processes, no rebuild)."""
    stage_pids = [s["pid"] for s in health(app)["stages"]]
    rebuilds, failures = metric(app, "bagel_stage_group_rebuilds"), metric(app, "bagel_deployment_failures")
    decoder = replica_pid("Decoder")
    chat = {"max_tokens": 2, "messages": [{"role": "user", "content": "Say something."}]}
    results: list[tuple[str, int, str | None, str]] = []
    stop = threading.Event()

    def load(kind: str, path: str, body: dict) -> None:
        while not stop.is_set():
            r = app.post(path, json=body)
            results.append((kind, r.status_code, r.headers.get("retry-after"), r.text[:200]))
            time.sleep(0.05)

    # One image client: an image request in flight waits for the new decoder (up to the deadline)
    # holding one of the two request slots; the other slot stays free for text.
    threads = [threading.Thread(target=load, args=("image", "/v1/images/generations", t2i(steps=3))),
               threading.Thread(target=load, args=("text", "/v1/chat/completions", chat))]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    os.kill(decoder, signal.SIGKILL)
    killed_at = len(results)
    deadline, recovered = time.monotonic() + 120, False
    while time.monotonic() < deadline and not recovered:  # Serve restarts it; the ingress probes it
        time.sleep(0.5)
        recovered = any(k == "image" and s == 200 for k, s, _, _ in results[killed_at + 1:]) and \
            app.get("/health").status_code == 200
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert recovered, results[-5:]
    after = results[killed_at:]
    refused = [(s, retry, text) for k, s, retry, text in after if s != 200]
    waited = [r for r in refused if r[0] == 504]  # in flight, waiting for the new decoder past the 8 s deadline
    told = [r for r in refused if r[0] != 504]
    assert told and all(s == 503 and retry == "1" and "decoder" in text for s, retry, text in told), refused
    assert len(waited) <= 2, refused
    text = [(s, body) for k, s, _, body in after if k == "text"]
    assert all(s == 200 for s, _ in text), f"text requests do not need the decoder: {text}"
    assert [s["pid"] for s in health(app)["stages"]] == stage_pids, "the stage workers were restarted"
    assert metric(app, "bagel_stage_group_rebuilds") == rebuilds and metric(app, "bagel_deployment_failures") > failures
    assert replica_pid("Decoder") != decoder


def test_stage_workers_that_cannot_be_rebuilt_get_the_replica_replaced(app, checkpoint_copy):
    """A stage worker dies and its group cannot be rebuilt (the weights are gone): after
    `stage_rebuild_tries` attempts /health says failed, requests get 503 with Retry-After, and the
    ingress's check_health fails, so Serve replaces the replica, whose new stage group works."""
    pids = [s["pid"] for s in health(app)["stages"]]
    weights, hidden = checkpoint_copy / "ema.safetensors", checkpoint_copy / "ema.safetensors.hidden"
    weights.rename(hidden)
    try:
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 180  # each attempt starts stage processes: seconds each, more on a busy machine
        while (r := app.get("/health")).json()["status"] != "failed":  # polling finds the dead worker
            assert r.json()["status"] in ("ok", "degraded") and time.monotonic() < deadline, r.text
            time.sleep(0.2)
        assert r.status_code == 503 and "could not be rebuilt (2 attempts)" in r.json()["error"], r.text
        refused = app.post("/v1/images/generations", json=t2i())
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    finally:
        hidden.rename(weights)
    statuses, deadline = [], time.monotonic() + 180  # Serve checks replica health every 10 s, then starts a new one
    while time.monotonic() < deadline:
        try:
            r = app.get("/health")
            statuses.append(r.json().get("status"))
            if r.status_code == 200:
                break
        except (httpx.TransportError, json.JSONDecodeError):
            statuses.append("no answer")
        time.sleep(0.5)
    assert r.status_code == 200, statuses[-5:]
    assert not {s["pid"] for s in health(app)["stages"]} & set(pids)
    assert app.post("/v1/images/generations", json=t2i()).status_code == 200


def malformed_requests(count: int, seed: int = 0) -> list[tuple[str, object]]:
    """(path, body) pairs that are each invalid in one random way. Bodies are JSON values, or
    bytes sent as they are."""
    rng = random.Random(seed)
    giant = io.BytesIO()
    Image.new("L", (3000, 3000)).save(giant, format="PNG")  # 9 MP > the app's 4 MP limit
    png = png_bytes(Image.new("RGB", (32, 32), (9, 9, 9)))
    images = [base64.b64encode(b"not an image at all").decode(), "@@@not base64@@@", base64.b64encode(png).decode()[:-7],
              base64.b64encode(giant.getvalue()).decode(), base64.b64encode(png[:40]).decode(), ""]
    wrong = [None, [], {}, "four", True, -1, 10**30, 1e308, "ğ\u0000\ud7ff", [1, 2, 3]]
    # Values that are wrong for each field (None is "unset" where a field is optional; any
    # non-empty string is a prompt), so that every such request is invalid in that field alone.
    numbers = [[], {}, "four", -1, 10**30, 1e308, [1, 2, 3], "ğ\u0000\ud7ff"]
    wrong_for = {"prompt": [None, [], {}, True, -1, 10**30, ""], "size": [[], {}, "four", True, -1, "65x64"],
                 "cfg_interval": [[], {}, "four", -1, [1, 2, 3], [0.9, 0.1]],
                 "cfg_renorm_type": [[], {}, "four", True, -1, "local"],
                 **{f: numbers for f in ("n", "num_timesteps", "cfg_text_scale", "cfg_img_scale", "timestep_shift",
                                         "cfg_renorm_min", "seed", "max_think_tokens")}}

    def gen():
        body = t2i()
        kind = rng.randrange(6)
        if kind == 0:
            field = rng.choice(sorted(wrong_for))
            body[field] = rng.choice(wrong_for[field])
        elif kind == 1:
            body.pop("prompt")
        elif kind == 2:
            body["size"] = rng.choice(["64", "64x", "x64", "0x0", "100000x64", "64x65", "-64x64", "🦊x🦊"])
        elif kind == 3:
            body[rng.choice(["foo", "guidance", "negative_promt", "🦊"])] = rng.choice(wrong)
        elif kind == 4:
            body["prompt"] = rng.choice(["", "   ", "\n\t", "x" * 20000])
        else:
            body.update(rng.choice([{"cfg_renorm_type": "local"}, {"cfg_interval": [0.9, 0.1]}, {"num_timesteps": 1},
                                    {"cfg_text_scale": 0.5}, {"n": 0}, {"seed": -5}, {"response_format": "png"}]))
        return "/v1/images/generations", body

    def edit():
        body = {"prompt": "make it blue", "image": base64.b64encode(png).decode(), "num_timesteps": 2}
        kind = rng.randrange(4)
        if kind == 0:
            body["image"] = rng.choice(images)
        elif kind == 1:
            body.pop(rng.choice(["prompt", "image"]))
        elif kind == 2:
            body["size"] = rng.choice(["64x72", "512x64", "big"])  # edits honour a valid size
        else:
            body["image"] = rng.choice(wrong[:7])
        return "/v1/images/edits", body

    def chat():
        msg = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
        kind = rng.randrange(6)
        if kind == 0:
            return "/v1/chat/completions", {"messages": []}
        if kind == 1:
            msg["role"] = rng.choice(["robot", "", None, 5])
        elif kind == 2:
            msg["content"] = [{"type": "image_url", "image_url": {"url": rng.choice(
                ["http://example.invalid/a.png", "data:image/png;base64," + rng.choice(images), "file:///etc/passwd"])}}]
        elif kind == 3:
            msg["content"] = [{"type": rng.choice(["audio", "video", 7])}]
        elif kind == 4:
            return "/v1/chat/completions", {"messages": [msg], "max_tokens": rng.choice([0, -1, 10**9, "many"])}
        else:
            return "/v1/chat/completions", {"messages": [msg], "temperature": rng.choice([-1, 5, "hot"])}
        return "/v1/chat/completions", {"messages": [msg]}

    def raw():
        path = rng.choice(["/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"])
        return path, rng.choice([b"", b"{", b"[1, 2]", b"null", b"\xff\xfe\x00", b'"just a string"', b"{" * 5000])

    makers = [gen, gen, edit, chat, raw]
    return [rng.choice(makers)() for _ in range(count)]


def test_fuzz_malformed_requests_get_only_4xx(app):
    bad = []
    for path, body in malformed_requests(300):
        if isinstance(body, bytes):
            r = app.post(path, content=body, headers={**AUTH, "content-type": "application/json"})
        else:
            r = app.post(path, json=body)
        if not 400 <= r.status_code < 500 or "error" not in r.json():
            bad.append((path, str(body)[:120], r.status_code, r.text[:200]))
    assert not bad, f"{len(bad)} malformed requests were not answered with a 4xx error: {bad[:5]}"
    assert app.post("/v1/images/generations", json=t2i()).status_code == 200


def test_soak_leaves_no_caches_and_flat_memory(app):
    pids = [s["pid"] for s in health(app)["stages"]]
    chat = {"max_tokens": 2, "messages": [{"role": "user", "content": "Say something."}]}
    for _ in range(20):  # warm up allocators and caches
        assert app.post("/v1/chat/completions", json=chat).status_code == 200
    before = [rss_bytes(p) for p in pids]
    statuses = []
    for i in range(240):
        if i % 8 == 0:
            statuses.append(app.post("/v1/images/generations", json=t2i(steps=2, seed=i)).status_code)
        else:
            statuses.append(app.post("/v1/chat/completions", json=chat).status_code)
    after = [rss_bytes(p) for p in pids]
    assert statuses == [200] * len(statuses)
    wait_idle(app)
    growth = [a - b for a, b in zip(after, before)]
    assert max(growth) < 64 * 2**20, f"stage process memory grew by {growth} bytes"


def test_loadtest_harness_reports(app, tmp_path):
    out = tmp_path / "report"
    code = loadtest.main(["--url", str(app.base_url).rstrip("/"), "--concurrency", "1,2", "--requests", "4",
                          "--duration", "60", "--steps", "2", "--max-tokens", "3", "--api-key", KEY,
                          "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads((out / "loadtest.json").read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["requests"] == 4 and level["ok"] == 4, level["errors"]
        assert level["latency_s"]["p50"] > 0 and level["requests_per_min"] > 0
        assert all(len(b) == 2 for b in [level["stage_busy_fraction"]])
        assert 0 < max(level["stage_busy_fraction"]) <= 1.0
        for task, stats in level["per_task"].items():
            assert stats["ok"] == stats["requests"] and stats["first_event_s"]["n"] == stats["ok"]
    chart = Image.open(out / "loadtest.png")
    assert chart.size[0] > 500 and np.asarray(chart).std() > 0


def test_loadtest_harness_through_the_ray_handle(app, tmp_path):
    out = tmp_path / "report"
    code = loadtest.main(["--handle", "bagel", "--rates", "4", "--requests", "5", "--duration", "30",
                          "--steps", "2", "--max-tokens", "3", "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads((out / "loadtest.json").read_text())
    level = report["levels"][0]
    assert report["mode"] == "open" and level["rate"] == 4
    assert level["requests"] >= 1 and level["ok"] == level["requests"], level["errors"]
    assert level["latency_s"]["p50"] > 0 and len(level["stage_busy_fraction"]) == 2


def test_no_exception_was_left_unretrieved_in_the_replicas():
    """Disconnects and failures above leave no "exception was never retrieved" report in any
    Ray worker's log (asyncio writes those to the process's stderr)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    reports = [f.name for f in logs.glob("worker-*.err") if "exception was never retrieved" in f.read_text(errors="replace")]
    assert not reports, reports
