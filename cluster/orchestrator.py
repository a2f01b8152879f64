"""The ingress deployment: HTTP routes (OpenAI-compatible) and Python handle methods.

It owns the pipeline's `StageGroup` (created with it, as one gang) and runs the `pipelines/`
algorithms through a `ClusterExecutor`, one worker thread per request in flight. Requests beyond
`max_concurrent_requests` wait in a bounded queue; beyond that they get 429 with Retry-After.
A client that disconnects (or a cancelled handle call) stops its request at the next step; its
contexts are freed on every stage whatever way the request ends.
"""

import asyncio
import base64
import io
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from bagel_model.config import BagelConfig
from bagel_model.demo import DEMO_LABEL, checkpoint_or_demo, is_demo_checkpoint
from bagel_model.errors import BagelError, InvalidRequest
from bagel_model.tokenizer import BagelTokenizer
from pipelines.noise import NoiseSource
from pipelines.tasks import generate_image, understand

from .api import ImageOutput, ImageTask, TextOutput, TextTask
from .args import AppArgs, Limits
from .devices import resolve_dtype
from .errors import Cancelled, DeadlineExceeded, StageFailed, Unauthorized, error_body, status_of
from .admission import Admission, kv_bytes_estimate
from .executor import ClusterExecutor
from .metrics import Metrics
from .protocol import ChatCompletionRequest, ImageEditRequest, ImageGenerationRequest, decode_image
from .stage_group import StageGroup

http = FastAPI(title="bagel-serve", description="BAGEL-7B-MoT: understanding, text-to-image, editing, think")

# The web UI ("the BAGEL playground", cluster/webui/): static files at /ui/ that call the API below.
http.mount("/ui", StaticFiles(directory=Path(__file__).parent / "webui", html=True), name="ui")


@http.get("/", include_in_schema=False)
async def _ui_root(request: Request) -> RedirectResponse:
    return RedirectResponse(request.scope.get("root_path", "") + "/ui/")


@http.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = f"{field}: {first.get('msg', 'invalid request')}" if field else first.get("msg", "invalid request")
    return JSONResponse(error_body(message, "invalid_request_error", field), status_code=400)


@http.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)


@http.exception_handler(BagelError)
async def _bagel_error(request: Request, exc: BagelError) -> JSONResponse:
    status, kind = status_of(exc)
    retry = getattr(exc, "retry_after_s", None)
    headers = {"Retry-After": str(retry)} if retry else None
    return JSONResponse(error_body(str(exc), kind), status_code=status, headers=headers)


class _Job:
    """One request's work in a worker thread: cancellation, deadline, events to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float):
        self.loop, self.cancel = loop, threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()
        self.created = time.monotonic()
        self.deadline = self.created + timeout_s

    def emit(self, event: dict) -> None:
        """Send an event to the client; raises if the request was cancelled or is overdue."""
        if self.cancel.is_set():
            raise Cancelled("request cancelled")
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded(f"request took longer than {self.deadline - self.created:.0f} s")
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _authorize(request: Request) -> None:
    """Bearer-token check when the service has an API key."""
    key = getattr(request.app.state, "api_key", None)
    if key and not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}"):
        raise Unauthorized("missing or wrong API key (send 'Authorization: Bearer <key>')")


def _with_seed(task: ImageTask, index: int) -> ImageTask:
    seed = task.seed + index if task.seed is not None else None
    return ImageTask(task.items, task.params, task.think, task.text_params, seed)


def _images_body(outputs: list[ImageOutput]) -> dict:
    return {"created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(o.png).decode(), "revised_prompt": o.thought,
                      "seed": o.seed, "width": o.width, "height": o.height} for o in outputs]}


def _decoded(items: list, limits: Limits) -> list:
    """A task's items with encoded image bytes opened as images, under the configured limits
    (handle callers send bytes; HTTP requests arrive decoded and checked)."""
    return [decode_image(i, limits) if isinstance(i, bytes) else i for i in items]


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except BagelError as e:
            status, kind = status_of(e)
            yield f"data: {json.dumps({**error_body(str(e), kind), 'status': status})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def _edit_body(request: Request, max_bytes: int) -> ImageEditRequest:
    """The edit request from JSON or from an OpenAI-style multipart form."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        fields: dict = {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                data = await value.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise InvalidRequest(f"{key}: larger than {max_bytes} bytes")
                fields[key.removesuffix("[]")] = base64.b64encode(data).decode()
            else:
                fields[key] = json.loads(value) if key == "cfg_interval" and value.startswith("[") else value
        if isinstance(fields.get("cfg_interval"), str):
            fields["cfg_interval"] = [float(v) for v in fields["cfg_interval"].split(",")]
        for flag in ("think", "stream"):
            if flag in fields:
                fields[flag] = str(fields[flag]).lower() in ("1", "true", "yes")
    else:
        try:
            fields = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidRequest("the body must be JSON or multipart/form-data") from None
        if not isinstance(fields, dict):
            raise InvalidRequest("the body must be a JSON object")
    try:
        return ImageEditRequest(**fields)
    except Exception as e:  # pydantic ValidationError, reported as a 400 with the field
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            raise RequestValidationError(e.errors()) from None
        raise


async def _events(job: _Job, future: asyncio.Future) -> AsyncIterator[dict]:
    """The job's events as they come, until it has finished (its exception is raised)."""
    while not (future.done() and job.events.empty()):
        getter = asyncio.ensure_future(job.events.get())
        await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield getter.result()
        else:
            getter.cancel()
    future.result()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(http)
class Orchestrator:
    def __init__(self, args: AppArgs, encoder, decoder):
        self.args = args
        http.state.api_key = args.api_key
        self.checkpoint = str(checkpoint_or_demo(args.checkpoint_dir))
        self.is_demo = is_demo_checkpoint(self.checkpoint)
        self.model_name = args.model_name or ("bagel-demo" if self.is_demo else Path(self.checkpoint).name)
        self.config = BagelConfig.from_checkpoint_dir(self.checkpoint)
        self.tokenizer = BagelTokenizer.from_dir(self.checkpoint)
        self.device = args.device if args.device != "auto" else ("cuda" if args.gpus_per_stage > 0 else "cpu")
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.stages = self._make_stages()
        self.executor = ClusterExecutor(self.config, self.tokenizer, self.stages, encoder, decoder, args.split_branches)
        self.pool = ThreadPoolExecutor(args.max_concurrent_requests, thread_name_prefix="request")
        self.admission = Admission(args.max_concurrent_requests, args.max_queued_requests,
                                   args.kv_cache_bytes, args.retry_after_s)
        self.metrics = Metrics()
        self.restarting: asyncio.Task | None = None
        self.completed = 0

    def _make_stages(self) -> StageGroup:
        a = self.args
        return StageGroup(self.checkpoint, self.config.llm.num_hidden_layers, a.num_stages, device=self.device,
                          dtype=self.dtype, gpus_per_stage=a.gpus_per_stage, memory_fraction=a.stage_memory_fraction,
                          transport=a.transport, layer_sizes=a.layer_sizes, random_weights=a.random_weights,
                          compile=a.compile, fp8=a.fp8)

    # -- Python handle API ------------------------------------------------------------------

    async def generate(self, task: ImageTask) -> ImageOutput:
        """Generate one image (text-to-image, editing, interleaved inputs)."""
        return await self._finish(await self._start("image", self._image_job, task))

    async def understand(self, task: TextTask) -> TextOutput:
        """Answer about text and images."""
        return await self._finish(await self._start("text", self._text_job, task))

    async def stats(self) -> dict:
        stages = await asyncio.to_thread(self.stages.broadcast, "stats")
        for name, key in (("live_kv_contexts", "live_contexts"), ("kv_bytes", "kv_bytes"),
                          ("gpu_memory_bytes", "gpu_memory_bytes")):
            self.metrics.set(name, sum(s[key] or 0 for s in stages))
        self.metrics.set("queue_depth", self.admission.in_system)
        return {"requests_in_system": self.admission.in_system, "requests_completed": self.completed,
                "kv_reserved_bytes": self.admission.kv_reserved, "stages": stages}

    # -- request lifecycle ------------------------------------------------------------------

    async def _start(self, kind: str, fn: Callable, task) -> tuple[_Job, asyncio.Future]:
        """Admit the request (or raise Overloaded), then queue it for a worker thread."""
        if self.restarting is not None:
            error = StageFailed("the MoT stage workers are restarting after a failure; retry shortly")
            error.retry_after_s = self.args.retry_after_s
            raise error
        layers = max(len(s.layers) for s in self.stages.specs)
        kv_bytes = kv_bytes_estimate(task, self.config, self.tokenizer, layers, self.dtype.itemsize,
                                     self.args.limits.max_prompt_tokens)
        job = _Job(asyncio.get_running_loop(), self.args.request_timeout_s)
        await self.admission.enter(kv_bytes)

        def run():
            outcome = "error"
            try:
                if job.cancel.is_set():
                    raise Cancelled("request cancelled while queued")
                job.emit({"type": "started", "queue_s": time.monotonic() - job.created})
                result = fn(task, job)
                outcome = "ok"
                return result
            except ray.exceptions.RayError as e:
                job.loop.call_soon_threadsafe(self._restart_stages)
                raise StageFailed(f"a worker failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
            except BagelError as e:
                outcome = type(e).__name__
                raise
            finally:
                latency = time.monotonic() - job.created
                job.loop.call_soon_threadsafe(self._done, kind, outcome, latency, kv_bytes)

        return job, asyncio.wrap_future(self.pool.submit(run))

    def _done(self, kind: str, outcome: str, latency_s: float, kv_bytes: int) -> None:
        self.completed += 1
        self.metrics.request(kind, outcome, latency_s)
        asyncio.ensure_future(self.admission.leave(kv_bytes))

    @staticmethod
    async def _finish(started: tuple[_Job, asyncio.Future]):
        job, future = started
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            job.cancel.set()
            raise

    def _restart_stages(self) -> None:
        """Replace the stage workers after one died (their KV caches are gone anyway)."""
        if self.restarting is None:
            self.restarting = asyncio.ensure_future(asyncio.to_thread(self._rebuild))

    def _rebuild(self) -> None:
        try:
            self.stages.shutdown()
        except Exception:  # the group is broken already; its actors are killed either way
            pass
        while True:
            try:
                self.stages = self.executor.stages = self._make_stages()
                break
            except Exception:
                time.sleep(self.args.retry_after_s)
        self.restarting = None

    def _image_job(self, task: ImageTask, job: _Job) -> ImageOutput:
        seed = task.seed if task.seed is not None else secrets.randbelow(2**31)
        items = _decoded(task.items, self.args.limits)
        result = generate_image(
            self.executor, items, task.params, think=task.think, text_params=task.text_params,
            noise=NoiseSource(seed),
            on_step=lambda p: job.emit({"type": "progress", "step": p.step, "num_steps": p.num_steps}),
            on_text=lambda delta: job.emit({"type": "thought", "delta": delta}),
        )
        buf = io.BytesIO()
        result.image.save(buf, format="PNG", compress_level=1)  # lossless; level 6 costs ~0.1 s more at 1024^2
        thought = result.thought.text if result.thought else None
        return ImageOutput(buf.getvalue(), result.image.width, result.image.height, seed, thought)

    def _text_job(self, task: TextTask, job: _Job) -> TextOutput:
        items = _decoded(task.items, self.args.limits)
        result = understand(self.executor, items, task.params, think=task.think, seed=task.seed,
                            on_text=lambda delta: job.emit({"type": "text", "delta": delta}))
        finish = "length" if len(result.token_ids) >= task.params.max_new_tokens else "stop"
        return TextOutput(result.text, len(result.token_ids), finish)

    # -- HTTP -------------------------------------------------------------------------------

    @http.get("/health")
    async def health(self) -> JSONResponse:
        base = {"model": self.model_name, "demo": self.is_demo, "notice": DEMO_LABEL if self.is_demo else None,
                "approximate": ["fp8"] if self.args.fp8 else []}
        if self.restarting is not None:
            return JSONResponse({**base, "status": "degraded", "error": "stage workers restarting"}, status_code=503)
        try:
            stats = await asyncio.wait_for(self.stats(), timeout=10)
        except Exception as e:  # a dead or hung worker makes the service degraded until replaced
            if isinstance(e, ray.exceptions.RayError):
                self._restart_stages()
            return JSONResponse({**base, "status": "degraded", "error": f"{type(e).__name__}: {e}"}, status_code=503)
        return JSONResponse({**base, "status": "ok", **stats})

    @http.get("/metrics")
    async def metrics_text(self) -> Response:
        if self.restarting is None:
            try:
                await asyncio.wait_for(self.stats(), timeout=10)
            except Exception:  # the gauges keep their last values; /health reports the failure
                pass
        return Response(self.metrics.prometheus_text(), media_type="text/plain; version=0.0.4")

    @http.get("/v1/models", dependencies=[Depends(_authorize)])
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "bagel-serve"}]}

    @http.post("/v1/images/generations", dependencies=[Depends(_authorize)])
    async def images_generations(self, body: ImageGenerationRequest):
        task, n = body.to_task(self.args.limits)
        return await self._images_response(task, n, body.stream)

    @http.post("/v1/images/edits", dependencies=[Depends(_authorize)])
    async def images_edits(self, request: Request):
        body = await _edit_body(request, self.args.limits.max_upload_bytes)
        task, n = body.to_task(self.args.limits)
        return await self._images_response(task, n, body.stream)

    @http.post("/v1/chat/completions", dependencies=[Depends(_authorize)])
    async def chat_completions(self, body: ChatCompletionRequest):
        task = body.to_task(self.args.limits)
        task.params.validate(self.args.limits.max_new_tokens)
        created, rid = int(time.time()), f"chatcmpl-{secrets.token_hex(12)}"
        started = await self._start("text", self._text_job, task)
        if body.stream:
            return _sse(self._chat_stream(started, rid, created))
        out = await self._finish(started)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "finish_reason": out.finish_reason}],
                "usage": {"prompt_tokens": 0, "completion_tokens": out.completion_tokens,
                          "total_tokens": out.completion_tokens}}

    async def _images_response(self, task: ImageTask, n: int, stream: bool):
        # Invalid parameters are a 400 before any work, also for a stream (whose status is 200 once it starts).
        task.params.validate(self.config.max_image_side, self.config.latent_downsample)
        task.text_params.validate()
        started = []
        try:
            for i in range(n):
                started.append(await self._start("image", self._image_job, _with_seed(task, i)))
        except BaseException:
            for job, _ in started:
                job.cancel.set()
            raise
        if stream:
            return _sse(self._image_stream(started))
        outputs = await asyncio.gather(*(self._finish(s) for s in started))
        return _images_body(outputs)

    async def _image_stream(self, started: list) -> AsyncIterator[dict]:
        try:
            for index, (job, future) in enumerate(started):
                async for event in _events(job, future):
                    yield {**event, "index": index}
            yield {"type": "image", **_images_body([f.result() for _, f in started])}
        finally:
            for job, _ in started:
                job.cancel.set()

    async def _chat_stream(self, started, rid: str, created: int) -> AsyncIterator[dict]:
        job, future = started
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        try:
            yield {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
            async for event in _events(job, future):
                # Only chat.completion.chunk objects: OpenAI clients cannot parse other events ("started").
                if event["type"] == "text":
                    yield {**chunk, "choices": [{"index": 0, "delta": {"content": event["delta"]}, "finish_reason": None}]}
            out = future.result()
            yield {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": out.finish_reason}]}
        finally:
            job.cancel.set()

