"""Server-sent event streams: the encoding (`data: <json>` per event, errors as events, then
`data: [DONE]`) and the event sequences of streamed image and chat requests.

Closing a stream (the client went away) cancels its jobs, which stop at their next step.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from bagel_model.errors import BagelError

from .errors import status_of
from .jobs import Job, cancel_all
from .responses import ChatCompletionChunk, ChatDelta, ChunkChoice, ErrorInfo, ImagesStreamEnd, StreamError

Event = BaseModel | dict


def sse_response(events: AsyncIterator[Event]) -> StreamingResponse:
    """The events as an SSE response; an error after the start becomes a `StreamError` event."""
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield _data(event)
        except BagelError as e:
            status, kind = status_of(e)
            yield _data(StreamError(error=ErrorInfo(message=str(e), type=kind), status=status))
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _data(event: Event) -> str:
    return f"data: {event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event)}\n\n"


async def image_events(jobs: list[Job]) -> AsyncIterator[Event]:
    """Each image's work events in turn (`started`, `thought`, `progress`, with its `index`),
    then one `image` event with all images."""
    try:
        for index, job in enumerate(jobs):
            async for event in job.stream():
                yield {**event, "index": index}
        yield ImagesStreamEnd.of([job.future.result() for job in jobs])
    finally:
        cancel_all(jobs)


async def chat_chunks(job: Job, completion_id: str, created: int, model: str) -> AsyncIterator[Event]:
    """OpenAI `chat.completion.chunk` objects only (OpenAI clients cannot parse other events):
    the role, the text deltas, then the finish reason."""
    def chunk(delta: ChatDelta, finish_reason: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=completion_id, created=created, model=model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)])

    try:
        yield chunk(ChatDelta(role="assistant"))
        async for event in job.stream():
            if event["type"] == "text":
                yield chunk(ChatDelta(content=event["delta"]))
        yield chunk(ChatDelta(), job.future.result().finish_reason)
    finally:
        job.cancel()
