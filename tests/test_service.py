"""The Ray Serve application against the in-process pipeline (CPU, float32).

One local Ray instance for the session; the app is deployed three times, one after another:
1 and 2 stages on the parity fixture checkpoint (2 LLM layers), 3 stages on a 4-layer demo
checkpoint. Every output (text-to-image with and without image guidance, editing, understanding
with an image, think mode), through the Python handle and through HTTP, must equal what
`LocalExecutor` (float32, same checkpoint, same seed) gives: text exactly, images within one
pixel level (several stages send the CFG branches as separate micro-batches, which changes
float summation order slightly). After every test each stage holds no context and no KV bytes.
"""
from __future__ import annotations

import asyncio
import base64
import io
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from bagel_model.demo import demo_config, demo_tokenizer, write_checkpoint
from bagel_model.transforms import open_image
from cluster.api import ImageOutput, ImageTask, TextOutput, TextTask
from pipelines.local import LocalExecutor
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS, ImageParams, TextParams
from pipelines.previews import render_preview
from pipelines.tasks import ImageResult, TextResult, generate_image, understand

from .service_app import data_url, max_pixel_diff, pixels, running_app, sse_events

# Small settings: 64x64 output (4x4 latent tokens), 3 model evaluations per image.
STEPS = 4
T2I = ImageParams(num_timesteps=STEPS, height=64, width=64)
EDIT = replace(EDIT_DEFAULTS, num_timesteps=STEPS)
THINK_TOKENS = 6
CHAT_TOKENS = 6
PROMPT = "A red fox in the snow."
EDIT_PROMPT = "Make it purple."
QUESTION = "What is in this picture?"
PIXEL_TOLERANCE = 1

# Ray Serve's own pydantic models warn on import; they are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

# stages: (checkpoint, expected [start, stop) layers per stage, model id). A checkpoint written by
# `write_checkpoint` has random weights and is served as the demo model.
APPS = {  # checkpoint, layers per stage, model name, weight format (df11 is exact: same references)
    1: ("fixture", [[0, 2]], "checkpoint", None),
    2: ("fixture", [[0, 1], [1, 2]], "checkpoint", "df11"),
    3: ("demo4", [[0, 2], [2, 3], [3, 4]], "bagel-demo", None),
}


# -- references: the in-process pipeline -------------------------------------------------------

class Reference:
    """`LocalExecutor` (one process, float32) on a checkpoint; results cached per request."""

    def __init__(self, checkpoint: Path, input_png: bytes):
        self.executor = LocalExecutor.from_checkpoint(checkpoint, dtype=torch.float32)
        self.input_png = input_png

    def _check_idle(self) -> None:
        assert self.executor.live_contexts() == []

    @lru_cache(maxsize=None)
    def t2i(self, prompt: str, params: ImageParams, seed: int, think_tokens: int | None = None) -> ImageResult:
        think = think_tokens is not None
        result = generate_image(self.executor, [prompt], params, think=think,
                                text_params=TextParams(max_new_tokens=think_tokens or 1), noise=NoiseSource(seed))
        self._check_idle()
        return result

    @lru_cache(maxsize=None)
    def edit(self, prompt: str, params: ImageParams, seed: int) -> ImageResult:
        result = generate_image(self.executor, [open_image(self.input_png), prompt], params, noise=NoiseSource(seed))
        self._check_idle()
        return result

    @lru_cache(maxsize=None)
    def chat(self, question: str, max_tokens: int, with_image: bool = True, think: bool = False) -> TextResult:
        items = [open_image(self.input_png), question] if with_image else [question]
        result = understand(self.executor, items, TextParams(max_new_tokens=max_tokens), think=think)
        self._check_idle()
        return result


@dataclass
class App:
    stages: int
    checkpoint: Path
    layers: list[list[int]]
    model: str
    url: str
    handle: object
    client: httpx.Client
    ref: Reference
    input_png: bytes
    quantize: str | None


@pytest.fixture(scope="session")
def input_png(fixture_dir: Path) -> bytes:
    return (fixture_dir / "inputs" / "input_gradient.png").read_bytes()


@pytest.fixture(scope="session")
def demo4_dir(tmp_path_factory) -> Path:
    tok = demo_tokenizer()
    return write_checkpoint(tmp_path_factory.mktemp("demo4"), demo_config(num_layers=4, vocab_size=len(tok)), tok)


class References(dict):
    """Reference per checkpoint name, created on first use."""

    def __init__(self, folders: dict[str, Path], input_png: bytes):
        super().__init__()
        self.folders, self.input_png = folders, input_png

    def __missing__(self, key: str) -> Reference:
        self[key] = Reference(self.folders[key], self.input_png)
        return self[key]


@pytest.fixture(scope="session")
def references(checkpoint_dir: Path, demo4_dir: Path, input_png: bytes) -> References:
    return References({"fixture": checkpoint_dir, "demo4": demo4_dir}, input_png)


@pytest.fixture(scope="module", params=sorted(APPS), ids=lambda n: f"{n}stage")
def app(request, ray_url, checkpoint_dir, demo4_dir, references, input_png) -> App:
    n = request.param
    which, layers, model, quantize = APPS[n]
    folder = {"fixture": checkpoint_dir, "demo4": demo4_dir}[which]
    args = {"checkpoint_dir": str(folder), "num_stages": n, "device": "cpu", "dtype": "float32", "quantize": quantize}
    with running_app(ray_url, args) as handle, httpx.Client(base_url=ray_url, timeout=120) as client:
        yield App(n, folder, layers, model, ray_url, handle, client, references[which], input_png, quantize)


def stage_stats(app: App) -> tuple[dict, dict]:
    health = app.client.get("/health")
    assert health.status_code == 200, health.text
    return health.json(), app.handle.stats.remote().result(timeout_s=30)


def idle_problems(health: dict, stats: dict, app: App) -> list[str]:
    problems = []
    if [(s["stage"], s["pid"]) for s in health["stages"]] != [(s["stage"], s["pid"]) for s in stats["stages"]]:
        problems.append("/health and stats() report different stage processes")
    for source, doc in (("/health", health), ("stats()", stats)):
        if len(doc["stages"]) != app.stages:
            problems.append(f"{source}: {len(doc['stages'])} stages, expected {app.stages}")
        if doc["requests_in_system"] != 0:
            problems.append(f"{source}: {doc['requests_in_system']} requests in system")
        for s in doc["stages"]:
            if s["live_contexts"] != 0 or s["kv_bytes"] != 0 or s["context_ids"] or s["latent_states"]:
                problems.append(f"{source}: stage {s['stage']} holds {s['live_contexts']} contexts "
                                f"{s['context_ids']}, {s['kv_bytes']} KV bytes, latents of {s['latent_states']}")
    return problems


def wait_idle(app: App, timeout_s: float) -> float:
    """Poll until every stage holds nothing (per /health and the handle's stats()); returns
    the seconds it took, fails with the last state otherwise."""
    start = time.monotonic()
    while True:
        health, stats = stage_stats(app)
        problems = idle_problems(health, stats, app)
        if not problems:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            pytest.fail("the stages did not become idle: " + "; ".join(problems))
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def no_leftovers(app):
    yield
    wait_idle(app, timeout_s=5)


# -- helpers -----------------------------------------------------------------------------------

def assert_image_matches(png, expected: ImageResult, what: str) -> None:
    diff = max_pixel_diff(png, expected.image)
    assert diff <= PIXEL_TOLERANCE, f"{what}: max abs pixel difference {diff} > {PIXEL_TOLERANCE}"


def assert_ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, f"{response.status_code}: {response.text[:500]}"
    return response.json()


def gen_body(seed: int, **extra) -> dict:
    return {"prompt": PROMPT, "size": "64x64", "num_timesteps": STEPS, "seed": seed, **extra}


def chat_body(app: App, **extra) -> dict:
    content = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": data_url(app.input_png)}}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": CHAT_TOKENS, **extra}


# -- the app as deployed -----------------------------------------------------------------------

def test_models(app):
    body = assert_ok(app.client.get("/v1/models"))
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [app.model]
    assert body["data"][0]["object"] == "model"


def test_health_shows_the_stages(app):
    health, stats = stage_stats(app)
    assert health["status"] == "ok"
    assert health["model"] == app.model
    assert health["demo"] is (app.model == "bagel-demo")
    assert (health["quantize"], health["approximate"]) == (app.quantize, [])  # df11 is not approximate
    assert [s["layers"] for s in health["stages"]] == app.layers
    assert [s["layers"] for s in stats["stages"]] == app.layers
    assert len({s["pid"] for s in health["stages"]}) == app.stages  # one process per stage


# -- parity through the Python handle ----------------------------------------------------------

@pytest.mark.parametrize("cfg_img_scale,refresh", [(1.0, 1), (1.5, 1), (1.5, 2)])
def test_handle_text_to_image(app, cfg_img_scale, refresh):
    """refresh 2: the approximate mode, whose estimates live on the last stage between steps."""
    params, seed = replace(T2I, cfg_img_scale=cfg_img_scale, cfg_refresh_interval=refresh), 7
    out = app.handle.generate.remote(ImageTask([PROMPT], params, seed=seed)).result(timeout_s=120)
    assert isinstance(out, ImageOutput)
    assert (out.width, out.height, out.seed, out.thought) == (64, 64, seed, None)
    expected = app.ref.t2i(PROMPT, params, seed)
    assert_image_matches(out.data, expected, "t2i")
    # The comparison discriminates: another seed's image is far from this one, and it is no flat image.
    assert max_pixel_diff(out.data, app.ref.t2i(PROMPT, params, seed + 1).image) > 10
    assert pixels(out.data).std() > 1.0


def test_handle_edit(app):
    seed = 8
    out = app.handle.generate.remote(ImageTask([app.input_png, EDIT_PROMPT], EDIT, seed=seed)).result(timeout_s=120)
    expected = app.ref.edit(EDIT_PROMPT, EDIT, seed)
    assert (out.width, out.height) == expected.image.size
    assert_image_matches(out.data, expected, "edit")


def test_handle_understand(app):
    out = app.handle.understand.remote(
        TextTask([app.input_png, QUESTION], TextParams(max_new_tokens=CHAT_TOKENS))).result(timeout_s=120)
    expected = app.ref.chat(QUESTION, CHAT_TOKENS)
    assert isinstance(out, TextOutput)
    assert expected.text.strip()
    assert out.text == expected.text
    assert out.completion_tokens == len(expected.token_ids)
    assert out.finish_reason == ("length" if len(expected.token_ids) >= CHAT_TOKENS else "stop")


def test_handle_think(app):
    # Image guidance > 1 with a thought: COND, CFG_TEXT and CFG_IMG all differ -> 3 branches per step.
    params, seed = replace(T2I, cfg_img_scale=1.5), 9
    task = ImageTask([PROMPT], params, think=True, text_params=TextParams(max_new_tokens=THINK_TOKENS), seed=seed)
    out = app.handle.generate.remote(task).result(timeout_s=120)
    expected = app.ref.t2i(PROMPT, params, seed, THINK_TOKENS)
    assert expected.thought is not None and expected.thought.text.strip()
    assert out.thought == expected.thought.text
    assert_image_matches(out.data, expected, "think")


# -- parity through HTTP -----------------------------------------------------------------------

@pytest.mark.parametrize("cfg_img_scale", [1.0, 1.5])
def test_http_generation(app, cfg_img_scale):
    seed = 21
    body = assert_ok(app.client.post("/v1/images/generations", json=gen_body(seed, cfg_img_scale=cfg_img_scale)))
    [item] = body["data"]
    assert (item["seed"], item["width"], item["height"], item["revised_prompt"]) == (seed, 64, 64, None)
    expected = app.ref.t2i(PROMPT, replace(T2I, cfg_img_scale=cfg_img_scale), seed)
    assert_image_matches(item["b64_json"], expected, "t2i")
    cached = body["usage"]["input_tokens_details"].pop("cached_tokens")
    assert cached == expected.prompt_tokens if cfg_img_scale == 1.5 else cached in (0, expected.prompt_tokens), (
        "the prompt of the first case is cached for the second")
    assert body["usage"] == {"input_tokens": expected.prompt_tokens, "output_tokens": 16,  # 4x4 latent tokens
                             "total_tokens": expected.prompt_tokens + 16,
                             "input_tokens_details": {"text_tokens": expected.prompt_tokens, "image_tokens": 0}}
    assert expected.prompt_tokens > len(app.ref.executor.tokenizer.encode(PROMPT))  # + the chat markers


def test_http_responses_say_where_the_time_went(app):
    """Server-Timing: the request's time per phase, which add up to at most the server's total,
    itself less than the client waited."""
    start = time.perf_counter()
    response = app.client.post("/v1/images/generations", json=gen_body(22))
    elapsed_ms = (time.perf_counter() - start) * 1000
    assert_ok(response)
    phases = {name: float(dur.removeprefix("dur=")) for name, _, dur in
              (part.strip().partition(";") for part in response.headers["server-timing"].split(","))}
    assert {"queue", "prefill", "denoise", "vae_decode", "encode_output", "respond", "total"} <= set(phases), phases
    assert all(v >= 0 for v in phases.values()) and phases["denoise"] > 0
    total = phases.pop("total")
    assert sum(phases.values()) <= total + 0.5 and total < elapsed_ms


def test_http_generation_n2(app):
    seed = 23
    body = assert_ok(app.client.post("/v1/images/generations", json=gen_body(seed, n=2)))
    assert [d["seed"] for d in body["data"]] == [seed, seed + 1]
    for item in body["data"]:
        assert_image_matches(item["b64_json"], app.ref.t2i(PROMPT, T2I, item["seed"]), f"seed {item['seed']}")


def test_http_think(app):
    seed = 25
    body = assert_ok(app.client.post("/v1/images/generations", json=gen_body(
        seed, think=True, max_think_tokens=THINK_TOKENS, cfg_img_scale=1.5)))
    [item] = body["data"]
    expected = app.ref.t2i(PROMPT, replace(T2I, cfg_img_scale=1.5), seed, THINK_TOKENS)
    assert item["revised_prompt"] == expected.thought.text
    assert_image_matches(item["b64_json"], expected, "think")


def edit_request(app: App, form: str, seed: int) -> dict:
    """httpx keyword arguments of an edit request in one of the accepted forms."""
    b64 = base64.b64encode(app.input_png).decode()
    if form == "multipart":
        return {"files": {"image": ("input.png", app.input_png, "image/png")},
                "data": {"prompt": EDIT_PROMPT, "num_timesteps": str(STEPS), "seed": str(seed)}}
    image = data_url(app.input_png) if form == "json_data_url" else b64
    return {"json": {"prompt": EDIT_PROMPT, "image": image, "num_timesteps": STEPS, "seed": seed}}


@pytest.mark.parametrize("form", ["multipart", "json_base64", "json_data_url"])
def test_http_edit(app, form):
    seed = 27
    body = assert_ok(app.client.post("/v1/images/edits", **edit_request(app, form, seed)))
    [item] = body["data"]
    expected = app.ref.edit(EDIT_PROMPT, EDIT, seed)
    assert (item["width"], item["height"], item["seed"]) == (*expected.image.size, seed)
    assert_image_matches(item["b64_json"], expected, f"edit ({form})")
    usage = body["usage"]
    assert usage["input_tokens"] == expected.prompt_tokens and usage["output_tokens"] == expected.image_tokens
    assert usage["input_tokens_details"]["image_tokens"] == expected.prompt_image_tokens > 0


@pytest.mark.parametrize("think", [False, True])
def test_http_chat(app, think):
    body = assert_ok(app.client.post("/v1/chat/completions", json=chat_body(app, think=think)))
    expected = app.ref.chat(QUESTION, CHAT_TOKENS, think=think)
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == ("length" if len(expected.token_ids) >= CHAT_TOKENS else "stop")
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)
    assert body["usage"]["prompt_tokens"] == expected.prompt_tokens > len(app.ref.executor.tokenizer.encode(QUESTION))
    assert body["usage"]["total_tokens"] == expected.prompt_tokens + len(expected.token_ids)
    assert body["model"] == app.model


# -- concurrency -------------------------------------------------------------------------------

def test_concurrent_mixed_requests(app):
    """Six mixed requests in flight at once all succeed with their sequential results."""
    requests = [
        ("t2i", "/v1/images/generations", {"json": gen_body(31)}),
        ("t2i img-cfg", "/v1/images/generations", {"json": gen_body(32, cfg_img_scale=1.5)}),
        ("think", "/v1/images/generations",
         {"json": gen_body(33, think=True, max_think_tokens=THINK_TOKENS, cfg_img_scale=1.5)}),
        ("edit multipart", "/v1/images/edits", edit_request(app, "multipart", 34)),
        ("edit json", "/v1/images/edits", edit_request(app, "json_base64", 35)),
        ("chat", "/v1/chat/completions", {"json": chat_body(app)}),
    ]
    expected = {
        "t2i": app.ref.t2i(PROMPT, T2I, 31),
        "t2i img-cfg": app.ref.t2i(PROMPT, replace(T2I, cfg_img_scale=1.5), 32),
        "think": app.ref.t2i(PROMPT, replace(T2I, cfg_img_scale=1.5), 33, THINK_TOKENS),
        "edit multipart": app.ref.edit(EDIT_PROMPT, EDIT, 34),
        "edit json": app.ref.edit(EDIT_PROMPT, EDIT, 35),
        "chat": app.ref.chat(QUESTION, CHAT_TOKENS),
    }
    peak = 0

    async def main():
        nonlocal peak
        async with httpx.AsyncClient(base_url=app.url, timeout=120) as client:
            tasks = [asyncio.ensure_future(client.post(path, **kw)) for _, path, kw in requests]
            while not all(t.done() for t in tasks):  # how many the app works on at once
                health = (await client.get("/health")).json()
                peak = max(peak, health["requests_in_system"])
                await asyncio.sleep(0.02)
            return [t.result() for t in tasks]

    responses = asyncio.run(main())
    for (name, _, _), response in zip(requests, responses, strict=True):
        body = assert_ok(response)
        if name == "chat":
            assert body["choices"][0]["message"]["content"] == expected[name].text, name
        else:
            item = body["data"][0]
            assert_image_matches(item["b64_json"], expected[name], name)
            if name == "think":
                assert item["revised_prompt"] == expected[name].thought.text
    assert peak >= 2, f"the requests did not overlap (at most {peak} in the system at once)"


# -- streaming ---------------------------------------------------------------------------------

def image_stream(events: list) -> tuple[list[dict], dict]:
    """The work events (thought deltas, progress) and the completed event of a one-image
    stream, checking its frame: an optional "started" notice first, then the work, then the
    image (OpenAI's image_generation.completed), then [DONE]; every event of image 0."""
    assert events[-1] == "[DONE]", events[-3:]
    assert isinstance(events[-2], dict) and events[-2]["type"] == "image_generation.completed", events[-3:]
    assert events[-2]["index"] == 0
    body = events[:-2]
    assert all(e["type"] in ("started", "thought", "progress") for e in body), [e["type"] for e in body]
    assert all(e["index"] == 0 for e in body)
    notices = [i for i, e in enumerate(body) if e["type"] == "started"]
    assert notices in ([], [0]), f"'started' must come first, once: at {notices}"
    return [e for e in body if e["type"] != "started"], events[-2]


def test_sse_generation(app):
    seed = 41
    with app.client.stream("POST", "/v1/images/generations", json=gen_body(seed, stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response.iter_lines()))
    work, image = image_stream(events)
    n = STEPS - 1
    assert [(e["type"], e["step"], e["num_steps"]) for e in work] == [("progress", i, n) for i in range(1, n + 1)]
    assert (image["seed"], image["size"], image["output_format"]) == (seed, "64x64", "png")
    assert_image_matches(image["b64_json"], app.ref.t2i(PROMPT, T2I, seed), "streamed t2i")


def test_sse_partial_images(app):
    """Previews come from the last stage (whichever topology) and equal the in-process
    pipeline's: the predicted clean latents after steps 2 and 4 of 5, through the linear map."""
    seed, params = 47, replace(T2I, num_timesteps=6)
    body = gen_body(seed, stream=True, num_timesteps=6, partial_images=2)
    with app.client.stream("POST", "/v1/images/generations", json=body) as response:
        assert response.status_code == 200
        events = [e for e in sse_events(response.iter_lines()) if isinstance(e, dict)]
    partials = [e for e in events if e["type"] == "image_generation.partial_image"]
    assert [(e["partial_image_index"], e["step"], e["num_steps"]) for e in partials] == [(0, 2, 5), (1, 4, 5)]
    assert events[-1]["type"] == "image_generation.completed"
    assert_image_matches(events[-1]["b64_json"], app.ref.t2i(PROMPT, params, seed), "image after previews")
    executor, previews = app.ref.executor, []
    generate_image(executor, [PROMPT], params, noise=NoiseSource(seed), previews=2, on_preview=previews.append)
    for event, preview in zip(partials, previews, strict=True):
        expected = render_preview(executor, preview.latent(), "linear")
        assert pixels(event["b64_json"]).shape == (8, 8, 3)
        assert max_pixel_diff(event["b64_json"], expected) <= PIXEL_TOLERANCE, f"preview {preview.index}"


def test_sse_think(app):
    seed = 43
    body = gen_body(seed, stream=True, think=True, max_think_tokens=THINK_TOKENS, cfg_img_scale=1.5)
    with app.client.stream("POST", "/v1/images/generations", json=body) as response:
        assert response.status_code == 200
        events = list(sse_events(response.iter_lines()))
    expected = app.ref.t2i(PROMPT, replace(T2I, cfg_img_scale=1.5), seed, THINK_TOKENS)
    work, image = image_stream(events)
    kinds = [e["type"] for e in work]
    thoughts = kinds.count("thought")
    assert thoughts >= 1
    assert kinds == ["thought"] * thoughts + ["progress"] * (STEPS - 1)
    assert [e["step"] for e in work[thoughts:]] == list(range(1, STEPS))
    assert "".join(e["delta"] for e in work[:thoughts]) == expected.thought.text
    assert image["revised_prompt"] == expected.thought.text
    assert_image_matches(image["b64_json"], expected, "streamed think")


def test_sse_chat(app):
    plain = assert_ok(app.client.post("/v1/chat/completions", json=chat_body(app)))
    answer = plain["choices"][0]["message"]["content"]
    assert answer == app.ref.chat(QUESTION, CHAT_TOKENS).text
    with app.client.stream("POST", "/v1/chat/completions", json=chat_body(app, stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c.get("object") == "chat.completion.chunk" and len(c["choices"]) == 1 for c in chunks), chunks
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(content) >= 2  # streamed in pieces, not in one chunk
    assert "".join(content) == answer


def test_abandoned_stream_frees_contexts(app):
    """A client that closes an image stream after the first progress event: the request stops
    and every stage frees its contexts within seconds (the full run would take far longer)."""
    body = {"prompt": PROMPT, "size": "256x256", "num_timesteps": 200, "n": 4, "seed": 1, "stream": True}
    with app.client.stream("POST", "/v1/images/generations", json=body) as response:
        assert response.status_code == 200
        events = sse_events(response.iter_lines())  # kept: dropping the generator closes the stream
        first = next(e for e in events if e["type"] != "started")
        assert first == {"type": "progress", "step": 1, "num_steps": 199, "index": 0}
        health = app.client.get("/health").json()
        assert health["requests_in_system"] == 4, health
        assert all(s["live_contexts"] > 0 and s["kv_bytes"] > 0 for s in health["stages"]), health
        # The sampler's state lives on the last stage (the COND context of each image in flight).
        *others, last = health["stages"]
        assert last["latent_states"] and all(k.endswith("/cond0") for k in last["latent_states"]), health
        assert not any(s["latent_states"] for s in others), health
    # Leaving the block closes the connection midway. The full run takes 8 s or more.
    wait_idle(app, timeout_s=3)
    # The app still serves, with the right results.
    item = assert_ok(app.client.post("/v1/images/generations", json=gen_body(45)))["data"][0]
    assert_image_matches(item["b64_json"], app.ref.t2i(PROMPT, T2I, 45), "after abandonment")


# -- bad requests ------------------------------------------------------------------------------

GEN, EDITS, CHAT = "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"
PNG = "<png>"  # replaced by the input image's base64
PNG_URL = "<png-url>"  # replaced by its data URL
PNG_FILE = "<png-file>"  # replaced by a multipart upload of it

# id: (path, httpx kwargs, words the error message must contain)
BAD_REQUESTS = {
    "gen-steps-not-int": (GEN, {"json": {"prompt": "x", "num_timesteps": "many"}}, ["num_timesteps", "integer"]),
    "gen-prompt-not-str": (GEN, {"json": {"prompt": 5}}, ["prompt", "string"]),
    "gen-scale-not-number": (GEN, {"json": {"prompt": "x", "cfg_text_scale": [4]}}, ["cfg_text_scale", "number"]),
    "gen-unknown-field": (GEN, {"json": {"prompt": "x", "steps": 3}}, ["steps", "unknown field"]),
    "gen-refresh-zero": (GEN, {"json": {"prompt": "x", "cfg_refresh_interval": 0}}, ["cfg_refresh_interval", "[1, 10]"]),
    "gen-size-too-large": (GEN, {"json": {"prompt": "x", "size": "512x64"}}, ["width", "256", "512"]),
    "gen-size-not-16": (GEN, {"json": {"prompt": "x", "size": "64x72"}}, ["height", "multiple of 16", "72"]),
    "gen-size-zero": (GEN, {"json": {"prompt": "x", "size": "0x64"}}, ["width", "got 0"]),
    "gen-size-unparsable": (GEN, {"json": {"prompt": "x", "size": "large"}}, ["size", "WIDTHxHEIGHT"]),
    "gen-empty-prompt": (GEN, {"json": {"prompt": ""}}, ["prompt", "at least 1 character"]),
    "gen-blank-prompt": (GEN, {"json": {"prompt": "   "}}, ["prompt is empty"]),
    "gen-missing-prompt": (GEN, {"json": {"size": "64x64"}}, ["prompt", "required"]),
    "gen-n-too-large": (GEN, {"json": {"prompt": "x", "n": 50}}, ["n must be at most 4"]),
    "gen-renorm-local": (GEN, {"json": {"prompt": "x", "cfg_renorm_type": "local"}}, ["cfg_renorm_type", "global"]),
    "gen-text-scale-below-1": (GEN, {"json": {"prompt": "x", "cfg_text_scale": 0.5}}, ["cfg_text_scale", "[1, 100]"]),
    "gen-too-many-steps": (GEN, {"json": {"prompt": "x", "num_timesteps": 5000}}, ["num_timesteps", "at most 200"]),
    "gen-negative-seed": (GEN, {"json": {"prompt": "x", "seed": -1}}, ["seed", "greater than or equal to 0"]),
    "gen-body-list": (GEN, {"json": [{"prompt": "x"}]}, ["JSON object"]),
    "gen-body-not-json": (GEN, {"content": b"prompt=x", "headers": {"content-type": "application/json"}}, ["JSON"]),
    # Streamed requests are checked before the stream starts (its status would be 200).
    "gen-stream-size-too-large": (GEN, {"json": {"prompt": "x", "size": "64x512", "stream": True}},
                                  ["height", "256", "512"]),
    "gen-stream-text-scale-below-1": (GEN, {"json": {"prompt": "x", "cfg_text_scale": 0.5, "stream": True}},
                                      ["cfg_text_scale", "[1, 100]"]),
    "gen-stream-interval-reversed": (GEN, {"json": {"prompt": "x", "cfg_interval": [0.9, 0.1], "stream": True}},
                                     ["cfg_interval", "start <= end"]),
    "gen-stream-n-too-large": (GEN, {"json": {"prompt": "x", "n": 5, "stream": True}}, ["n must be at most 4"]),
    "edit-stream-renorm-min": (EDITS, {"files": {"image": PNG_FILE}, "data": {"prompt": "x", "cfg_renorm_min": "2",
                                                                           "stream": "true"}},
                               ["cfg_renorm_min", "[0, 1]"]),
    "edit-broken-base64": (EDITS, {"json": {"prompt": "x", "image": "bm90!!base64"}}, ["image", "base64"]),
    "edit-not-an-image": (EDITS, {"json": {"prompt": "x", "image": base64.b64encode(b"GIF89a garbage").decode()}},
                          ["not a decodable image"]),
    "edit-multipart-not-an-image": (EDITS, {"files": {"image": ("a.png", b"\x89PNG garbage", "image/png")},
                                            "data": {"prompt": "x"}}, ["not a decodable image"]),
    "edit-size-too-large": (EDITS, {"json": {"prompt": "x", "image": PNG, "size": "64x512"}}, ["height", "256"]),
    "edit-too-many-images": (EDITS, {"json": {"prompt": "x", "image": [PNG] * 5}}, ["at most 4 images"]),
    "edit-missing-image": (EDITS, {"json": {"prompt": "x"}}, ["image", "required"]),
    "edit-empty-prompt": (EDITS, {"files": {"image": PNG_FILE}, "data": {"prompt": ""}},
                          ["prompt", "at least 1 character"]),
    "edit-steps-not-int": (EDITS, {"files": {"image": PNG_FILE},
                                   "data": {"prompt": "x", "num_timesteps": "four"}}, ["num_timesteps", "integer"]),
    "edit-mask": (EDITS, {"json": {"prompt": "x", "image": PNG, "mask": PNG}}, ["mask", "not supported"]),
    "edit-unknown-field": (EDITS, {"files": {"image": PNG_FILE}, "data": {"prompt": "x", "strength": "0.5"}},
                           ["strength", "unknown field"]),
    "edit-body-not-object": (EDITS, {"json": ["x"]}, ["JSON object"]),
    "edit-body-not-json": (EDITS, {"content": b"{oops", "headers": {"content-type": "application/json"}}, ["JSON"]),
    "chat-no-text": (CHAT, {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": PNG_URL}}]}]}}, ["no text"]),
    "chat-blank-text": (CHAT, {"json": {"messages": [{"role": "user", "content": "  "}]}}, ["no text"]),
    "chat-text-part-without-text": (CHAT, {"json": {"messages": [{"role": "user", "content": [{"type": "text"}]}]}},
                                    ["text part needs 'text'"]),
    "chat-http-image-url": (CHAT, {"json": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}},
        ["data URL"]),
    "chat-broken-data-url": (CHAT, {"json": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}},
        ["base64"]),
    "chat-not-an-image": (CHAT, {"json": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"text").decode()}}]}]}},
        ["not a decodable image"]),
    "chat-no-messages": (CHAT, {"json": {"messages": []}}, ["messages", "at least 1"]),
    "chat-bad-role": (CHAT, {"json": {"messages": [{"role": "robot", "content": "hi"}]}}, ["role"]),
    "chat-unknown-field": (CHAT, {"json": {"messages": [{"role": "user", "content": "hi"}], "top_z": 5}},
                           ["top_z", "unknown field", "top_p"]),
    "chat-top-k": (CHAT, {"json": {"messages": [{"role": "user", "content": "hi"}], "top_k": 5}},
                   ["top_k", "not supported", "top-k"]),
    "chat-logprobs": (CHAT, {"json": {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}},
                      ["logprobs", "not supported"]),
    "chat-audio-modality": (CHAT, {"json": {"messages": [{"role": "user", "content": "hi"}],
                                            "modalities": ["audio"]}}, ["modalities", "'text' or 'image'"]),
    "chat-max-tokens-zero": (CHAT, {"json": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}},
                             ["max_tokens", "greater than or equal to 1"]),
    "chat-max-tokens-too-large": (CHAT, {"json": {"messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 10**6}}, ["max_tokens", "at most 4096"]),
    "chat-n-too-large": (CHAT, {"json": {"messages": [{"role": "user", "content": "hi"}], "n": 5}},
                         ["n must be at most 4"]),
    "chat-body-string": (CHAT, {"json": "hello"}, ["JSON object"]),
}


def _fill(value, png: bytes):
    """The request with the placeholders replaced by the input image."""
    if isinstance(value, dict):
        return {k: _fill(v, png) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, png) for v in value]
    return {PNG: base64.b64encode(png).decode(), PNG_URL: data_url(png),
            PNG_FILE: ("input.png", png, "image/png")}.get(value, value) if isinstance(value, str) else value


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request(app, case):
    path, kwargs, words = BAD_REQUESTS[case]
    kwargs = {k: _fill(v, app.input_png) if k in ("json", "files", "data") else v for k, v in kwargs.items()}
    response = app.client.post(path, **kwargs)
    assert response.status_code == 400, f"{response.status_code}: {response.text[:300]}"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    message = body["error"]["message"]
    assert isinstance(message, str)
    assert body["error"]["type"] == "invalid_request_error"
    missing = [w for w in words if w.lower() not in message.lower()]
    assert not missing, f"message {message!r} does not mention {missing}"
    # The app keeps serving.
    answer = assert_ok(app.client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
    assert answer["choices"][0]["message"]["content"] == app.ref.chat("hi", 2, with_image=False).text


def test_bad_request_through_handle(app):
    """Invalid parameters reach a handle caller as InvalidRequest, and nothing stays allocated."""
    from bagel_model.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="height"):
        app.handle.generate.remote(ImageTask([PROMPT], replace(T2I, height=72), seed=1)).result(timeout_s=60)
    with pytest.raises(InvalidRequest, match="empty"):
        app.handle.understand.remote(TextTask(["  "])).result(timeout_s=60)
    buf = io.BytesIO()
    Image.new("RGB", (400, 20)).save(buf, format="PNG")  # 20:1, over the configured 16:1
    with pytest.raises(InvalidRequest, match="aspect ratio"):
        app.handle.understand.remote(TextTask([buf.getvalue(), QUESTION])).result(timeout_s=60)
