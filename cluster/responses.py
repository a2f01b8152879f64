"""The HTTP API's response models: OpenAI's shapes (images, chat completions and their stream
chunks, model list, errors) plus BAGEL's extra image fields. Built from the service's typed
results (`ImageOutput`, `TextOutput`), never by hand."""
from __future__ import annotations

import base64
import time
from typing import Literal

from pydantic import BaseModel, Field, model_serializer

from .api import ImageOutput, TextOutput
from .image_encoding import MEDIA_TYPES


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="the image, base64 (response_format b64_json)")
    url: str | None = Field(None, description="where to fetch the image (response_format url), for a while")
    revised_prompt: str | None = Field(None, description="the thought, in think mode")
    seed: int
    width: int
    height: int

    @classmethod
    def of(cls, output: ImageOutput, url: str | None = None) -> ImageData:
        return cls(b64_json=None if url else base64.b64encode(output.data).decode(), url=url,
                   revised_prompt=output.thought, seed=output.seed, width=output.width, height=output.height)


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int
    cached_tokens: int = 0  # of the input tokens, reused from the prefix cache (by every image)


class ImagesUsage(BaseModel):
    """OpenAI's image usage: the prompt's tokens as the model saw them (input images included),
    and the tokens generated (a thought's, and each image's latent tokens)."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, outputs: list[ImageOutput]) -> ImagesUsage:
        """The prompt once (every image answers the same one), the generated tokens summed."""
        prompt = max(o.prompt_tokens for o in outputs)
        images = max(o.prompt_image_tokens for o in outputs)
        generated = sum(o.output_tokens for o in outputs)
        details = InputTokensDetails(text_tokens=prompt - images, image_tokens=images,
                                     cached_tokens=min(o.cached_tokens for o in outputs))
        return cls(input_tokens=prompt, input_tokens_details=details,
                   output_tokens=generated, total_tokens=prompt + generated)


class ImagesResponse(BaseModel):
    """POST /v1/images/generations and /v1/images/edits"""

    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: str
    quality: str
    size: str = Field(description="WIDTHxHEIGHT of the images")
    usage: ImagesUsage

    @classmethod
    def of(cls, outputs: list[ImageOutput], quality: str, urls: list[str] | None = None) -> ImagesResponse:
        first = outputs[0]
        data = [ImageData.of(o, u) for o, u in zip(outputs, urls or [None] * len(outputs))]
        return cls(created=int(time.time()), data=data, output_format=first.output_format, quality=quality,
                   size=f"{first.width}x{first.height}", usage=ImagesUsage.of(outputs))


class ImageStreamEvent(BaseModel):
    """OpenAI's image stream events (`image_generation.*` or `image_edit.*`), plus `index`: which
    of the n images it belongs to."""

    type: str
    b64_json: str
    created_at: int
    size: str = Field(description="WIDTHxHEIGHT of the final image")
    quality: str
    background: Literal["opaque"] = "opaque"
    output_format: str
    index: int


class ImagePartialEvent(ImageStreamEvent):
    """A preview (`<route>.partial_image`), after step `step` of `num_steps`."""

    partial_image_index: int
    step: int
    num_steps: int


class ImageCompletedEvent(ImageStreamEvent):
    """The image (`<route>.completed`)."""

    usage: ImagesUsage
    seed: int
    width: int
    height: int
    revised_prompt: str | None = None


class ImageURLContent(BaseModel):
    url: str = Field(description="a data URL of the image")


class ImagePart(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURLContent

    @classmethod
    def of(cls, output: ImageOutput) -> ImagePart:
        return cls(image_url=ImageURLContent(url=f"data:{MEDIA_TYPES[output.output_format]};base64,"
                                                 + base64.b64encode(output.data).decode()))


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


def image_content(output: ImageOutput) -> list[ImagePart | TextPart]:
    """An image answer's content parts: the image, then the thought (think mode). The image
    comes first: clients of other BAGEL servers look for it in the first part."""
    return [ImagePart.of(output), *([TextPart(text=output.thought)] if output.thought else [])]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | list[ImagePart | TextPart] = Field(description="the answer; or, for images, content parts")


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # of the prompt tokens, reused from the prefix cache (by every choice)


class Usage(BaseModel):
    """prompt_tokens: the prompt as the model saw it (chat markers and image tokens included)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, outputs: list[TextOutput | ImageOutput]) -> Usage:
        """The prompt once (every choice answers the same one), the completions' tokens summed
        (an image's: its thought and its latent tokens)."""
        prompt = max(o.prompt_tokens for o in outputs)
        completion = sum(o.completion_tokens if isinstance(o, TextOutput) else o.output_tokens for o in outputs)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=min(o.cached_tokens for o in outputs)))


class ChatCompletion(BaseModel):
    """POST /v1/chat/completions"""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage

    @classmethod
    def of(cls, completion_id: str, created: int, model: str,
           outputs: list[TextOutput | ImageOutput]) -> ChatCompletion:
        choices = [ChatChoice(index=i, message=AssistantMessage(content=o.text), finish_reason=o.finish_reason)
                   if isinstance(o, TextOutput) else
                   ChatChoice(index=i, message=AssistantMessage(content=image_content(o)), finish_reason="stop")
                   for i, o in enumerate(outputs)]
        return cls(id=completion_id, created=created, model=model, choices=choices, usage=Usage.of(outputs))


class ChatDelta(BaseModel):
    """What a chunk adds; only the fields set appear (the last chunk's delta is `{}`). Text
    comes as strings, an image as a list with its content part."""

    role: Literal["assistant"] | None = None
    content: str | list[ImagePart | TextPart] | None = None

    @model_serializer(mode="wrap")
    def _without_unset(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None


class StepProgress(BaseModel):
    step: int
    num_steps: int


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion. Images in the making report `progress`
    (their choice's delta is empty); with stream_options.include_usage the last chunk has the
    `usage` and no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    progress: StepProgress | None = None
    usage: Usage | None = None

    @model_serializer(mode="wrap")
    def _without_unset(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None or k not in ("progress", "usage")}


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
    def of(cls, message: str, kind: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
        return cls(error=ErrorInfo(message=message, type=kind, param=param, code=code))


class StreamError(ErrorResponse):
    """An error after a stream has started (its HTTP status is 200 by then): the status it would have had."""

    status: int
