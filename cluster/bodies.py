"""Request bodies at the boundary: a size limit (HTTP 413, checked as the bytes arrive), JSON
parsed off the event loop, and a bounded thread pool for the CPU work of turning a request into
a task (base64, image headers), so that the event loop only moves bytes and `/health` stays fast.

JSON is parsed by pydantic-core's parser, which refuses invalid UTF-8, lone surrogates and
nesting deeper than 200 levels (Python's `json` would raise RecursionError) and says where. NaN
and infinities pass the parser; the request models refuse them, naming the field.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from pydantic_core import from_json
from starlette.requests import Request
from starlette.types import Message, Receive

from bagel_model.errors import InvalidRequest

from .errors import PayloadTooLarge

PARSE_THREADS = 2  # request parsing is short (tens of ms for the largest bodies); decoding runs elsewhere
T = TypeVar("T")


async def off_loop(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on the app's parse pool, made on first use (Serve pickles the app unstarted)."""
    pool = getattr(request.app.state, "parse_pool", None)
    if pool is None:
        pool = request.app.state.parse_pool = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="parse")
    return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args))


def size_limited(request: Request, max_bytes: int) -> Request:
    """The request with its body limited to `max_bytes`: a larger declared Content-Length is
    refused before anything is read, a larger body as soon as the excess arrives."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the request body has {declared} bytes; at most {max_bytes} are accepted")
    received = 0
    receive: Receive = request.receive

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise PayloadTooLarge(f"the request body is larger than the {max_bytes} bytes at most accepted")
        return message

    return Request(request.scope, limited)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_json(request: Request) -> bool:
    media = media_type(request)
    return media == "application/json" or media.endswith("+json")


async def read_json(request: Request) -> dict:
    """The body as a JSON object, parsed off the event loop; `InvalidRequest` otherwise."""
    if not is_json(request):
        raise InvalidRequest("send the body as JSON with 'content-type: application/json'")
    body = await request.body()
    if not body.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    return await off_loop(request, parse_json_object, body)


def parse_json_object(body: bytes) -> dict:
    try:
        data = from_json(body)
    except ValueError as e:
        raise InvalidRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"the body must be a JSON object, not {_json_kind(data)}")
    return data


def _json_kind(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
