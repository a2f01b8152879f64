"""The HTTP layer: the FastAPI app with the OpenAI-compatible routes, the web UI, auth, and the
error handlers that turn every failure into OpenAI's error shape.

Routes are thin: parse the request (`protocol.py`), call the `BagelService`, shape the response
(`responses.py`, `sse.py`). The app finds its service through the `service` callable given to
`create_app` (in the Serve deployment: the replica's service; in tests: any service), so the
layer runs without Serve too.

The API routes (`BoundaryRoute`) check the API key before a body is read and limit the body's
size; the body is parsed, normalized, validated and turned into a task (base64, image headers)
off the event loop (`bodies.py`). Every failure, also an unexpected one, answers in OpenAI's
error shape; only our own failures are 5xx.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

from bagel_model.errors import BagelError, InvalidRequest

from .api import ImageTask, TextTask
from .args import Limits
from .bodies import off_loop, read_json, size_limited
from .errors import RetryLater, Unauthorized, status_of
from .forms import edit_fields, json_fields
from .jobs import Job, cancel_all
from .knobs import web_knobs
from .normalize import parse, problems_error, validation_problems
from .phases import server_timing, timed
from .image_encoding import MEDIA_TYPES
from .protocol import ChatCompletionRequest, ImageEditRequest, ImageGenerationRequest, ImageResponseFields
from .responses import ChatCompletion, ErrorResponse, ImagesResponse, ModelCard, ModelList
from .service import BagelService
from .sse import chat_chunks, image_events, sse_response

WEBUI = Path(__file__).parent / "webui"  # "the BAGEL playground": static files that call this API


def create_app(service: Callable[[], BagelService]) -> FastAPI:
    # No /docs or /redoc pages: FastAPI's load their scripts from a CDN (blank offline); the
    # OpenAPI document itself is at /openapi.json.
    app = FastAPI(title="bagel-serve", description="BAGEL-7B-MoT: understanding, text-to-image, editing, think",
                  docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_middleware(DisconnectAsMessage)
    app.mount("/ui", StaticFiles(directory=WEBUI, html=True), name="ui")
    app.include_router(router)
    app.include_router(api)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(BagelError, _bagel_error)
    app.add_exception_handler(Exception, _unexpected)
    app.openapi = lambda: _openapi(app)
    return app


class DisconnectAsMessage:
    """ASGI apps learn that the client went away from an `http.disconnect` message; Serve's
    `receive` raises `TaskCancelledError` instead, which a streaming response then raises out of
    the app, and Serve leaves that exception unretrieved in a future (a traceback in the logs at
    every disconnect). This turns it into the message."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        async def receive_or_disconnect() -> dict:
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        await self.app(scope, receive_or_disconnect, send)


def current_service(request: Request) -> BagelService:
    return request.app.state.service()


Service = Annotated[BagelService, Depends(current_service)]


def authorize(request: Request, service: Service) -> None:
    """Bearer-token check when the service has an API key."""
    key = service.args.api_key
    if key and not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}"):
        raise Unauthorized("missing or wrong API key (send 'Authorization: Bearer <key>')")


def json_response(body: BaseModel, status_code: int = 200, headers: dict | None = None) -> Response:
    return Response(body.model_dump_json(), status_code=status_code, headers=headers, media_type="application/json")


class BoundaryRoute(APIRoute):
    """An API route: the API key is checked before the body is read (a malformed body without
    a key gets 401) and the body is limited to `Limits.max_body_bytes` (413) as it arrives."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            service = current_service(request)
            authorize(request, service)
            return await handler(size_limited(request, service.limits.max_body_bytes))

        return guarded


# -- routes ----------------------------------------------------------------------------------

router = APIRouter()  # the UI, health and metrics: no key
api = APIRouter(route_class=BoundaryRoute)
API = {"responses": {status: {"model": ErrorResponse} for status in (400, 401, 413, 429, 503, 504)}}


@router.get("/", include_in_schema=False)
async def ui_root(request: Request) -> RedirectResponse:
    return RedirectResponse(request.scope.get("root_path", "") + "/ui/")


@router.get("/knobs", include_in_schema=False)
async def knobs() -> dict:
    """The web UI's knobs and per-task defaults (cluster/knobs.py)."""
    return web_knobs()


@router.get("/health")
async def health(service: Service) -> Response:
    status, body = await service.health()
    return JSONResponse(body, status_code=status)


@router.get("/metrics")
async def metrics(service: Service) -> Response:
    return Response(await service.metrics_text(), media_type=CONTENT_TYPE_LATEST)


@api.get("/v1/models", response_model=ModelList, **API)
async def models(service: Service) -> Response:
    return json_response(ModelList(data=[ModelCard(id=service.model_name)]))


@api.get("/v1/models/{model_id:path}", response_model=ModelCard,
         **{**API, "responses": {**API["responses"], 404: {"model": ErrorResponse}}})
async def model(model_id: str, service: Service) -> Response:
    if model_id != service.model_name:
        return json_response(ErrorResponse.of(f"The model '{model_id}' does not exist; this service serves "
                                              f"'{service.model_name}'", "invalid_request_error", "model",
                                              "model_not_found"), 404)
    return json_response(ModelCard(id=service.model_name))


def _body(model: type[BaseModel], multipart: bool = False) -> dict:
    """OpenAPI request body of a route that parses its body itself (normalize.parse)."""
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if multipart:  # the same fields; `image` also as one or more files (`image` or `image[]`)
        content["multipart/form-data"] = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    return {"requestBody": {"required": True, "content": content}}


REQUEST_MODELS = (ImageGenerationRequest, ImageEditRequest, ChatCompletionRequest)


@api.post("/v1/images/generations", response_model=ImagesResponse, openapi_extra=_body(ImageGenerationRequest),
          **API)
async def images_generations(request: Request, service: Service) -> Response:
    fields = await read_json(request)
    body, (task, n) = await off_loop(request, _parsed, fields, ImageGenerationRequest, service.limits)
    return await _images(service, body, task, n, "image_generation", request)


@api.post("/v1/images/edits", response_model=ImagesResponse, openapi_extra=_body(ImageEditRequest, True), **API)
async def images_edits(request: Request, service: Service) -> Response:
    fields = await edit_fields(request, service.limits)
    body, (task, n) = await off_loop(request, _parsed, fields, ImageEditRequest, service.limits)
    return await _images(service, body, task, n, "image_edit", request)


@router.get("/v1/images/files/{image_id}", responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}},
                                                      404: {"model": ErrorResponse}})
async def image_file(image_id: str, service: Service) -> Response:
    """An image made with response_format 'url', while it lasts (no API key: the id is the key)."""
    found = await service.image_store.get(image_id)
    if found is None:
        return json_response(ErrorResponse.of("no such image: unknown or expired (images are kept "
                                              f"{service.args.image_url_ttl_s:.0f} s)", "invalid_request_error"), 404)
    data, media_type, left_s = found
    return Response(data, media_type=media_type, headers={"Cache-Control": f"private, max-age={int(left_s)}"})


@api.post("/v1/chat/completions", response_model=ChatCompletion, openapi_extra=_body(ChatCompletionRequest),
          **API)
async def chat_completions(request: Request, service: Service) -> Response:
    fields = await read_json(request)
    body, (task, n) = await off_loop(request, _parsed, fields, ChatCompletionRequest, service.limits)
    jobs = await (service.start_images(task, n) if isinstance(task, ImageTask) else service.start_texts(task, n))
    completion_id, created = f"chatcmpl-{jobs[0].request_id}", int(time.time())
    if body.stream:
        return sse_response(chat_chunks(jobs, completion_id, created, service.model_name, body.include_usage))
    outputs = await _results(jobs)
    return _timed_response(lambda: ChatCompletion.of(completion_id, created, service.model_name, outputs), jobs)


async def _images(service: BagelService, body: ImageResponseFields, task: ImageTask, n: int, kind: str,
                  request: Request) -> Response:
    """`kind`: "image_generation" or "image_edit", as OpenAI names the stream events."""
    jobs = await service.start_images(task, n)
    if body.stream:
        return sse_response(image_events(jobs, kind, body.quality_name, task.output.format))
    outputs = await _results(jobs)
    urls = None
    if body.response_format == "url":
        ids = [await service.image_store.put(o.data, MEDIA_TYPES[o.output_format]) for o in outputs]
        urls = [str(request.url_for("image_file", image_id=i)) for i in ids]
    return _timed_response(lambda: ImagesResponse.of(outputs, body.quality_name, urls), jobs)


async def _results(jobs: list[Job]) -> list:
    try:
        return list(await asyncio.gather(*(job.result() for job in jobs)))
    except BaseException:
        cancel_all(jobs)
        raise


def _parsed(fields: dict, model: type[BaseModel], limits: Limits) -> tuple[BaseModel, tuple[ImageTask | TextTask, int]]:
    """The request and its task, from the body's fields (off the event loop)."""
    body = parse(json_fields(fields), model)
    return body, body.to_task(limits)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document plus the request models of the routes that parse their own body."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_MODELS:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        app.openapi_schema = doc
    return app.openapi_schema


def _timed_response(body: Callable[[], BaseModel], jobs: list[Job]) -> Response:
    """The JSON response, with a Server-Timing header: the jobs' time per phase (summed), the
    time to build the response, and the request's total from admission."""
    phases: dict[str, float] = defaultdict(float)
    for job in jobs:
        for phase, seconds in job.phases.items():
            phases[phase] += seconds
    with timed(phases, "respond"):
        content = body().model_dump_json()
    phases["total"] = time.monotonic() - min(job.created for job in jobs)
    return Response(content, media_type="application/json", headers={"Server-Timing": server_timing(phases)})


# -- errors ----------------------------------------------------------------------------------

async def _invalid_body(request: Request, exc: RequestValidationError) -> Response:
    """FastAPI's own validation (path and query parameters): every problem in one 400."""
    return await _bagel_error(request, problems_error(validation_problems(exc.errors()) or [("body", "invalid")]))


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return json_response(ErrorResponse.of(str(exc.detail), kind), exc.status_code, exc.headers)


async def _bagel_error(request: Request, exc: BagelError) -> Response:
    status, kind = status_of(exc)
    retry = exc.retry_after_s if isinstance(exc, RetryLater) else None
    param = exc.param if isinstance(exc, InvalidRequest) else None
    return json_response(ErrorResponse.of(str(exc), kind, param), status,
                         {"Retry-After": str(retry)} if retry else None)


async def _unexpected(request: Request, exc: Exception) -> Response:
    """A failure of ours (a bug): 500 in the same shape; Starlette logs the traceback after."""
    return json_response(ErrorResponse.of(f"internal error ({type(exc).__name__})", "server_error"), 500)
