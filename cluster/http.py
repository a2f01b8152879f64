"""The HTTP layer: the FastAPI app with the OpenAI-compatible routes, the web UI, auth, and the
error handlers that turn every failure into OpenAI's error shape.

Routes are thin: parse the request (`protocol.py`), call the `BagelService`, shape the response
(`responses.py`, `sse.py`). The app finds its service through the `service` callable given to
`create_app` (in the Serve deployment: the replica's service; in tests: any service), so the
layer runs without Serve too.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from bagel_model.errors import BagelError

from .api import ImageTask
from .errors import RetryLater, Unauthorized, status_of
from .forms import edit_request
from .jobs import cancel_all
from .protocol import ChatCompletionRequest, ImageEditRequest, ImageGenerationRequest
from .responses import ChatCompletion, ErrorResponse, ImagesResponse, ModelCard, ModelList
from .service import BagelService
from .sse import chat_chunks, image_events, sse_response

WEBUI = Path(__file__).parent / "webui"  # "the BAGEL playground": static files that call this API


def create_app(service: Callable[[], BagelService]) -> FastAPI:
    app = FastAPI(title="bagel-serve", description="BAGEL-7B-MoT: understanding, text-to-image, editing, think")
    app.state.service = service
    app.mount("/ui", StaticFiles(directory=WEBUI, html=True), name="ui")
    app.include_router(router)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(BagelError, _bagel_error)
    return app


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


# -- routes ----------------------------------------------------------------------------------

router = APIRouter()
API = {"dependencies": [Depends(authorize)],
       "responses": {status: {"model": ErrorResponse} for status in (400, 401, 429, 503, 504)}}


@router.get("/", include_in_schema=False)
async def ui_root(request: Request) -> RedirectResponse:
    return RedirectResponse(request.scope.get("root_path", "") + "/ui/")


@router.get("/health")
async def health(service: Service) -> Response:
    status, body = await service.health()
    return JSONResponse(body, status_code=status)


@router.get("/metrics")
async def metrics(service: Service) -> Response:
    return Response(await service.metrics_text(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", response_model=ModelList, **API)
async def models(service: Service) -> Response:
    return json_response(ModelList(data=[ModelCard(id=service.model_name)]))


@router.post("/v1/images/generations", response_model=ImagesResponse, **API)
async def images_generations(body: ImageGenerationRequest, service: Service) -> Response:
    task, n = body.to_task(service.limits)
    return await _images(service, task, n, body.stream)


EDIT_BODY = {"requestBody": {"required": True, "content": {  # parsed by forms.edit_request
    "application/json": {"schema": ImageEditRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "description": "the same fields; `image` as a file"}}}}}


@router.post("/v1/images/edits", response_model=ImagesResponse, openapi_extra=EDIT_BODY, **API)
async def images_edits(request: Request, service: Service) -> Response:
    body = await edit_request(request, service.limits.max_upload_bytes)
    task, n = body.to_task(service.limits)
    return await _images(service, task, n, body.stream)


@router.post("/v1/chat/completions", response_model=ChatCompletion, **API)
async def chat_completions(body: ChatCompletionRequest, service: Service) -> Response:
    job = await service.start_text(body.to_task(service.limits))
    completion_id, created = f"chatcmpl-{job.request_id}", int(time.time())
    if body.stream:
        return sse_response(chat_chunks(job, completion_id, created, service.model_name))
    return json_response(ChatCompletion.of(completion_id, created, service.model_name, await job.result()))


async def _images(service: BagelService, task: ImageTask, n: int, stream: bool) -> Response:
    jobs = await service.start_images(task, n)
    if stream:
        return sse_response(image_events(jobs))
    try:
        outputs = await asyncio.gather(*(job.result() for job in jobs))
    except BaseException:
        cancel_all(jobs)
        raise
    return json_response(ImagesResponse.of(outputs))


# -- errors ----------------------------------------------------------------------------------

async def _invalid_body(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {}
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = f"{field}: {first.get('msg', 'invalid request')}" if field else first.get("msg", "invalid request")
    return json_response(ErrorResponse.of(message, "invalid_request_error", field), 400)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return json_response(ErrorResponse.of(str(exc.detail), kind), exc.status_code, exc.headers)


async def _bagel_error(request: Request, exc: BagelError) -> Response:
    status, kind = status_of(exc)
    retry = exc.retry_after_s if isinstance(exc, RetryLater) else None
    return json_response(ErrorResponse.of(str(exc), kind), status, {"Retry-After": str(retry)} if retry else None)
