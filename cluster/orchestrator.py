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
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from ray import serve

from bagel_model.config import BagelConfig
from bagel_model.demo import DEMO_LABEL, checkpoint_or_demo, is_demo_checkpoint
from bagel_model.errors import BagelError, InvalidRequest
from bagel_model.tokenizer import BagelTokenizer
from bagel_model.transforms import open_image
from pipelines.noise import NoiseSource
from pipelines.tasks import generate_image, understand

from .api import ImageOutput, ImageTask, TextOutput, TextTask
from .args import AppArgs
from .devices import resolve_dtype
from .errors import Cancelled, Overloaded, StageFailed, error_body, status_of
from .executor import ClusterExecutor
from .protocol import ChatCompletionRequest, ImageEditRequest, ImageGenerationRequest
from .stage_group import StageGroup

http = FastAPI(title="bagel-serve", description="BAGEL-7B-MoT: understanding, text-to-image, editing, think")


@http.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = f"{field}: {first.get('msg', 'invalid request')}" if field else first.get("msg", "invalid request")
    return JSONResponse(error_body(message, "invalid_request_error", field), status_code=400)


@http.exception_handler(BagelError)
async def _bagel_error(request: Request, exc: BagelError) -> JSONResponse:
    status, kind = status_of(exc)
    headers = {"Retry-After": str(getattr(exc, "retry_after_s", 1))} if isinstance(exc, Overloaded) else None
    return JSONResponse(error_body(str(exc), kind), status_code=status, headers=headers)


class _Job:
    """One request's work in a worker thread: cancellation flag and event queue to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.cancel = loop, threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()

    def emit(self, event: dict) -> None:
        if self.cancel.is_set():
            raise Cancelled("request cancelled")
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _with_seed(task: ImageTask, index: int) -> ImageTask:
    seed = task.seed + index if task.seed is not None else None
    return ImageTask(task.items, task.params, task.think, task.text_params, seed)


def _images_body(outputs: list[ImageOutput]) -> dict:
    return {"created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(o.png).decode(), "revised_prompt": o.thought,
                      "seed": o.seed, "width": o.width, "height": o.height} for o in outputs]}


def _as_image(data: bytes) -> Image.Image:
    return open_image(data)


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


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(http)
class Orchestrator:
    def __init__(self, args: AppArgs, encoder, decoder):
        self.args = args
        checkpoint = str(checkpoint_or_demo(args.checkpoint_dir))
        self.is_demo = is_demo_checkpoint(checkpoint)
        self.model_name = args.model_name or ("bagel-demo" if self.is_demo else Path(checkpoint).name)
        self.config = BagelConfig.from_checkpoint_dir(checkpoint)
        self.tokenizer = BagelTokenizer.from_dir(checkpoint)
        device = args.device if args.device != "auto" else ("cuda" if args.gpus_per_stage > 0 else "cpu")
        self.stages = StageGroup(
            checkpoint, self.config.llm.num_hidden_layers, args.num_stages, device=device,
            dtype=resolve_dtype(args.dtype, device), gpus_per_stage=args.gpus_per_stage,
            memory_fraction=args.stage_memory_fraction, transport=args.transport, layer_sizes=args.layer_sizes,
            random_weights=args.random_weights,
        )
        self.executor = ClusterExecutor(self.config, self.tokenizer, self.stages, encoder, decoder, args.split_branches)
        self.pool = ThreadPoolExecutor(args.max_concurrent_requests, thread_name_prefix="request")
        self.in_system = 0
        self.completed = 0

    # -- Python handle API ------------------------------------------------------------------

    async def generate(self, task: ImageTask) -> ImageOutput:
        return await self._finish(self._start(self._image_job, task))

    async def understand(self, task: TextTask) -> TextOutput:
        return await self._finish(self._start(self._text_job, task))

    async def stats(self) -> dict:
        stages = await asyncio.to_thread(self.stages.broadcast, "stats")
        return {"requests_in_system": self.in_system, "requests_completed": self.completed, "stages": stages}

    # -- request lifecycle ------------------------------------------------------------------

    def _start(self, fn: Callable, task) -> tuple[_Job, asyncio.Future]:
        limit = self.args.max_concurrent_requests + self.args.max_queued_requests
        if self.in_system >= limit:
            error = Overloaded(f"server busy: {self.in_system} requests in flight or queued; retry later")
            error.retry_after_s = self.args.retry_after_s
            raise error
        self.in_system += 1
        job = _Job(asyncio.get_running_loop())

        def run():
            try:
                if job.cancel.is_set():
                    raise Cancelled("request cancelled while queued")
                return fn(task, job)
            except ray.exceptions.RayError as e:
                raise StageFailed(f"a worker failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
            finally:
                job.loop.call_soon_threadsafe(self._done)

        return job, asyncio.wrap_future(self.pool.submit(run))

    def _done(self) -> None:
        self.in_system -= 1
        self.completed += 1

    @staticmethod
    async def _finish(started: tuple[_Job, asyncio.Future]):
        job, future = started
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            job.cancel.set()
            raise

    def _image_job(self, task: ImageTask, job: _Job) -> ImageOutput:
        seed = task.seed if task.seed is not None else secrets.randbelow(2**31)
        items = [_as_image(i) if isinstance(i, bytes) else i for i in task.items]
        result = generate_image(
            self.executor, items, task.params, think=task.think, text_params=task.text_params,
            noise=NoiseSource(seed),
            on_step=lambda p: job.emit({"type": "progress", "step": p.step, "num_steps": p.num_steps}),
            on_text=lambda delta: job.emit({"type": "thought", "delta": delta}),
        )
        buf = io.BytesIO()
        result.image.save(buf, format="PNG")
        thought = result.thought.text if result.thought else None
        return ImageOutput(buf.getvalue(), result.image.width, result.image.height, seed, thought)

    def _text_job(self, task: TextTask, job: _Job) -> TextOutput:
        items = [_as_image(i) if isinstance(i, bytes) else i for i in task.items]
        result = understand(self.executor, items, task.params, think=task.think, seed=task.seed,
                            on_text=lambda delta: job.emit({"type": "text", "delta": delta}))
        finish = "length" if len(result.token_ids) >= task.params.max_new_tokens else "stop"
        return TextOutput(result.text, len(result.token_ids), finish)

    # -- HTTP -------------------------------------------------------------------------------

    @http.get("/health")
    async def health(self) -> JSONResponse:
        try:
            stats = await asyncio.wait_for(self.stats(), timeout=10)
        except Exception as e:  # a dead or hung worker makes the service degraded
            return JSONResponse({"status": "degraded", "error": f"{type(e).__name__}: {e}"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.model_name, "demo": self.is_demo,
                             "notice": DEMO_LABEL if self.is_demo else None, **stats})

    @http.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "bagel-serve"}]}

    @http.post("/v1/images/generations")
    async def images_generations(self, body: ImageGenerationRequest):
        task, n = body.to_task(self.args.limits)
        return await self._images_response(task, n, body.stream)

    @http.post("/v1/images/edits")
    async def images_edits(self, request: Request):
        body = await _edit_body(request, self.args.limits.max_upload_bytes)
        task, n = body.to_task(self.args.limits)
        return await self._images_response(task, n, body.stream)

    @http.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        task = body.to_task(self.args.limits)
        created, rid = int(time.time()), f"chatcmpl-{secrets.token_hex(12)}"
        if body.stream:
            return _sse(self._chat_stream(task, rid, created))
        out = await self.understand(task)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "finish_reason": out.finish_reason}],
                "usage": {"prompt_tokens": 0, "completion_tokens": out.completion_tokens,
                          "total_tokens": out.completion_tokens}}

    async def _images_response(self, task: ImageTask, n: int, stream: bool):
        tasks = [_with_seed(task, i) for i in range(n)]
        if stream:
            return _sse(self._image_stream(tasks))
        outputs = await asyncio.gather(*(self.generate(t) for t in tasks))
        return _images_body(outputs)

    async def _image_stream(self, tasks: list[ImageTask]) -> AsyncIterator[dict]:
        started = [self._start(self._image_job, t) for t in tasks]
        try:
            for index, (job, future) in enumerate(started):
                while not (future.done() and job.events.empty()):
                    getter = asyncio.ensure_future(job.events.get())
                    await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield {**getter.result(), "index": index}
                    else:
                        getter.cancel()
                future.result()
            yield {"type": "image", **_images_body([f.result() for _, f in started])}
        finally:
            for job, _ in started:
                job.cancel.set()

    async def _chat_stream(self, task: TextTask, rid: str, created: int) -> AsyncIterator[dict]:
        job, future = self._start(self._text_job, task)
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        try:
            yield {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
            while not (future.done() and job.events.empty()):
                getter = asyncio.ensure_future(job.events.get())
                await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    delta = getter.result()["delta"]
                    yield {**chunk, "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]}
                else:
                    getter.cancel()
            out = future.result()
            yield {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": out.finish_reason}]}
        finally:
            job.cancel.set()
