"""The HTTP API's response models: OpenAI's shapes (images, chat completions and their stream
chunks, model list, errors) plus BAGEL's extra image fields. Built from the service's typed
results (`ImageOutput`, `TextOutput`), never by hand."""
from __future__ import annotations

import base64
import time
from typing import Literal

from pydantic import BaseModel, Field, model_serializer

from .api import ImageOutput, TextOutput


class ImageData(BaseModel):
    b64_json: str = Field(description="the PNG, base64")
    revised_prompt: str | None = Field(None, description="the thought, in think mode")
    seed: int
    width: int
    height: int

    @classmethod
    def of(cls, output: ImageOutput) -> ImageData:
        return cls(b64_json=base64.b64encode(output.png).decode(), revised_prompt=output.thought,
                   seed=output.seed, width=output.width, height=output.height)


class ImagesResponse(BaseModel):
    """POST /v1/images/generations and /v1/images/edits"""

    created: int
    data: list[ImageData]

    @classmethod
    def of(cls, outputs: list[ImageOutput]) -> ImagesResponse:
        return cls(created=int(time.time()), data=[ImageData.of(o) for o in outputs])


class ImagesStreamEnd(ImagesResponse):
    """The last event of a streamed image request (before [DONE]): the images."""

    type: Literal["image"] = "image"


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """POST /v1/chat/completions"""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage

    @classmethod
    def of(cls, completion_id: str, created: int, model: str, output: TextOutput) -> ChatCompletion:
        return cls(id=completion_id, created=created, model=model,
                   choices=[ChatChoice(message=AssistantMessage(content=output.text),
                                       finish_reason=output.finish_reason)],
                   usage=Usage(prompt_tokens=0, completion_tokens=output.completion_tokens,
                               total_tokens=output.completion_tokens))


class ChatDelta(BaseModel):
    """What a chunk adds; only the fields set appear (the last chunk's delta is `{}`)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_unset(self, handler) -> dict[str, str]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "bagel-serve"


class ModelList(BaseModel):
    """GET /v1/models"""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape (so OpenAI clients raise their typed exceptions)."""

    error: ErrorInfo

    @classmethod
    def of(cls, message: str, kind: str, param: str | None = None) -> ErrorResponse:
        return cls(error=ErrorInfo(message=message, type=kind, param=param))


class StreamError(ErrorResponse):
    """An error after a stream has started (its HTTP status is 200 by then): the status it would have had."""

    status: int
