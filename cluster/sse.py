"""Server-sent event streams: the encoding (`data: <json>` per event, errors as events, then
`data: [DONE]`; a `: keep-alive` comment when the stream has been quiet, e.g. while the request
waits in the queue, so that proxies and clients keep it open) and the event sequences of
streamed image and chat requests.

Closing a stream (the client went away) cancels its jobs, which stop at their next step.
"""
from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from bagel_model.errors import BagelError

from .api import ImageOutput
from .errors import status_of
from .jobs import KEEPALIVE, Job, cancel_all
from .responses import (ChatCompletionChunk, ChatDelta, ChunkChoice, ErrorInfo, ImageCompletedEvent,
                        ImagePartialEvent, ImagesUsage, StepProgress, StreamError, Usage, image_content)

Event = BaseModel | dict


def sse_response(events: AsyncIterator[Event]) -> StreamingResponse:
    """The events as an SSE response; an error after the start becomes a `StreamError` event."""
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield ": keep-alive\n\n" if event is KEEPALIVE else _data(event)
        except BagelError as e:
            status, kind = status_of(e)
            yield _data(StreamError(error=ErrorInfo(message=str(e), type=kind), status=status))
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _data(event: Event) -> str:
    return f"data: {event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event)}\n\n"


async def image_events(jobs: list[Job], kind: str, quality: str, output_format: str) -> AsyncIterator[Event]:
    """Each image in turn: its work events (`started`, `thought`, `progress`: ours; OpenAI's
    clients skip types they do not know), its previews as OpenAI's `<kind>.partial_image`
    events, then the image as `<kind>.completed` (`kind`: "image_generation" or "image_edit").
    Every event carries the image's `index`."""
    try:
        for index, job in enumerate(jobs):
            async for event in job.stream():
                if event is KEEPALIVE:
                    yield event
                elif event["type"] == "partial_image":
                    yield ImagePartialEvent(
                        type=f"{kind}.partial_image", created_at=int(time.time()), quality=quality,
                        output_format=output_format, index=index, size=f"{event['width']}x{event['height']}",
                        **{k: event[k] for k in ("b64_json", "partial_image_index", "step", "num_steps")})
                else:
                    yield {**event, "index": index}
            output: ImageOutput = job.future.result()
            yield ImageCompletedEvent(
                type=f"{kind}.completed", b64_json=base64.b64encode(output.data).decode(), created_at=int(time.time()),
                size=f"{output.width}x{output.height}", quality=quality, output_format=output.output_format,
                index=index, usage=ImagesUsage.of([output]), seed=output.seed, width=output.width, height=output.height,
                revised_prompt=output.thought)
    finally:
        cancel_all(jobs)


async def chat_chunks(jobs: list[Job], completion_id: str, created: int, model: str,
                      include_usage: bool = False) -> AsyncIterator[Event]:
    """OpenAI `chat.completion.chunk` objects only (OpenAI clients cannot parse other events),
    one choice after another: the role, the text deltas (an answer, or an image's thought), an
    image's step `progress`, the image as a content part; then the finish reason. With
    `include_usage`, a last chunk with the usage."""
    def chunk(index: int, delta: ChatDelta, finish_reason: str | None = None, **extra) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=completion_id, created=created, model=model,
                                   choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish_reason)],
                                   **extra)

    try:
        for index, job in enumerate(jobs):
            yield chunk(index, ChatDelta(role="assistant"))
            async for event in job.stream():
                if event is KEEPALIVE:
                    yield event
                elif event["type"] in ("text", "thought"):
                    yield chunk(index, ChatDelta(content=event["delta"]))
                elif event["type"] == "progress":
                    yield chunk(index, ChatDelta(), progress=StepProgress(step=event["step"],
                                                                         num_steps=event["num_steps"]))
            output = job.future.result()
            if isinstance(output, ImageOutput):
                yield chunk(index, ChatDelta(content=image_content(output)[:1]))
                yield chunk(index, ChatDelta(), "stop")
            else:
                yield chunk(index, ChatDelta(), output.finish_reason)
        if include_usage:
            yield ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[],
                                      usage=Usage.of([job.future.result() for job in jobs]))
    finally:
        cancel_all(jobs)
