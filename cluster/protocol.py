"""The HTTP API's request models (OpenAI shapes plus BAGEL's knobs) and their conversion to
`ImageTask` / `TextTask`. Pydantic lives here and in args.py only.

Bodies reach these models through `normalize.parse` (peers' aliases, ignored and unsupported
OpenAI fields, unknown names); each model's `api` names its table there.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import replace
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from bagel_model.errors import InvalidRequest
from pipelines.params import CHAT_DEFAULTS, EDIT_DEFAULTS, ImageParams, TextParams, image_knobs

from .api import ImageTask, TextTask
from .args import Limits
from .image_encoding import OutputFormat
from .inputs import inspect_image

class _Strict(BaseModel):
    """Unknown fields are errors; so are NaN and infinities (the JSON parser lets them through to
    be refused here, naming the field)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# A field per sampler knob (pipelines/params.py), unset by default.
_SamplerKnobs = create_model("_SamplerKnobs", __base__=_Strict, **{
    k.name: (k.type | None, Field(None, description=k.help)) for k in image_knobs()})


class ImageKnobs(_SamplerKnobs):
    """BAGEL's image knobs (official names); unset fields take the task's defaults."""

    negative_prompt: str | None = Field(None, description="the text-free guidance branch's context: what to steer "
                                        "away from (empty: BAGEL's default, no text)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    think: bool = Field(False, description="plan in text first (the thought is returned with the image)")
    max_think_tokens: int | None = Field(None, ge=1, description=f"longest thought in generated tokens "
                                         f"(default {TextParams().max_new_tokens})")

    def image_params(self, base: ImageParams, limits: Limits, size: str | None) -> ImageParams:
        overrides = {k: v for k, v in self.model_dump(include=set(ImageParams.__dataclass_fields__)).items()
                     if v is not None}
        if overrides.get("num_timesteps", 0) > limits.max_num_timesteps:
            raise InvalidRequest(f"num_timesteps must be at most {limits.max_num_timesteps}", param="num_timesteps")
        if size is not None and size != "auto":  # "auto": the task's default size
            overrides["width"], overrides["height"] = _parse_size(size)
        return base.__class__(**{**base.__dict__, **overrides})

    def image_task(self, items: list, base: ImageParams, limits: Limits, size: str | None,
                   thought: TextParams) -> ImageTask:
        return ImageTask(items, self.image_params(base, limits, size), self.think, thought, self.seed,
                         self.negative_prompt)

    def thought_params(self, limits: Limits, do_sample: bool, temperature: float | None,
                       max_tokens: int | None = None) -> TextParams:
        """How the thought is decoded (think mode): greedy unless sampled, at most
        max_think_tokens (else `max_tokens`, else TextParams' default within the service's limit) tokens."""
        base = TextParams()
        n = self.max_think_tokens or max_tokens or min(base.max_new_tokens, limits.max_new_tokens)
        if n > limits.max_new_tokens:
            raise InvalidRequest(f"max_think_tokens must be at most {limits.max_new_tokens}", param="max_think_tokens")
        return replace(base, max_new_tokens=n, do_sample=do_sample,
                       temperature=base.temperature if temperature is None else temperature)


# OpenAI's `quality` as BAGEL's num_timesteps (schedule points; the official default is 50).
# "auto" (or none) keeps the task's default; "standard" and "hd" are DALL-E 3's names.
QUALITY_STEPS = {"low": 20, "medium": 30, "high": 50, "xhigh": 75, "max": 100, "standard": 50, "hd": 75}
QUALITY_NAMES = {"standard": "high", "hd": "xhigh"}  # as reported back (OpenAI's current names)


class ImageResponseFields(ImageKnobs):
    """OpenAI's images fields shared by generations and edits, how the images go back, and the
    thought's decoding."""

    prompt: str = Field(min_length=1)
    do_sample: bool | None = Field(None, description="sample the thought (default: greedy)")
    text_temperature: float | None = Field(None, ge=0, description=f"temperature of a sampled thought "
                                           f"(default {TextParams().temperature})")
    stream: bool = Field(False, description="server-sent events: progress per step, previews, then the image")
    model: str | None = None
    n: int = Field(1, ge=1, description="images; up to the service's limits.max_n")
    size: str | None = Field(None, description="'WIDTHxHEIGHT', multiples of 16, or 'auto'; default the model's "
                             "largest square, or an input image's size")
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="b64_json (default), or url: a link to the image, kept image_url_ttl_s seconds (not "
        "with stream)")
    output_format: Literal["png", "jpeg", "webp", "gif", "svg"] | None = Field(
        None, description="png (default), jpeg or webp")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg / webp quality (default 100)")
    partial_images: int | None = Field(None, ge=0, le=3, description="with stream: previews of the image in the "
                                       "making, sent as image_generation.partial_image / image_edit.partial_image")
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"] | None = Field(
        None, description="num_timesteps: " + ", ".join(f"{q} {n}" for q, n in QUALITY_STEPS.items())
        + f"; auto: the default ({ImageParams().num_timesteps}). With num_timesteps too, the two must agree")

    @property
    def quality_name(self) -> str:
        """The quality as OpenAI's responses name it."""
        return QUALITY_NAMES.get(self.quality, self.quality or "auto")

    def _task(self, items: list, base: ImageParams, limits: Limits) -> tuple[ImageTask, int]:
        _check_text(self.prompt, limits)
        _check_n(self.n, limits)
        if self.response_format == "url" and self.stream:
            raise InvalidRequest("response_format 'url' cannot be streamed: streamed images come as b64_json",
                                 param="response_format")
        thought = self.thought_params(limits, bool(self.do_sample), self.text_temperature)
        task = self.image_task([*items, self.prompt], base, limits, self.size, thought)
        steps = QUALITY_STEPS.get(self.quality)
        if steps is not None:
            if self.num_timesteps is not None and self.num_timesteps != steps:
                raise InvalidRequest(f"quality {self.quality!r} means num_timesteps {steps}, but num_timesteps is "
                                     f"{self.num_timesteps}: send one of them", param="quality,num_timesteps")
            if steps > limits.max_num_timesteps:
                raise InvalidRequest(f"quality {self.quality!r} ({steps} timesteps) exceeds this service's "
                                     f"max_num_timesteps {limits.max_num_timesteps}", param="quality")
            task = replace(task, params=replace(task.params, num_timesteps=steps))
        output = OutputFormat(self.output_format or "png", self.output_compression).validate()
        return replace(task, output=output, previews=(self.partial_images or 0) if self.stream else 0), self.n


class ImageGenerationRequest(ImageResponseFields):
    """POST /v1/images/generations"""

    api: ClassVar[str] = "images"

    def to_task(self, limits: Limits) -> tuple[ImageTask, int]:
        return self._task([], ImageParams(), limits)


class ImageEditRequest(ImageResponseFields):
    """POST /v1/images/edits (JSON form; the multipart form is converted into this). Several
    images are BAGEL's interleaved context, in order, before the prompt."""

    api: ClassVar[str] = "edits"

    image: str | list[str] = Field(description="base64 or a data URL; or a list of them (several images)")

    def to_task(self, limits: Limits) -> tuple[ImageTask, int]:
        encoded = self.image if isinstance(self.image, list) else [self.image]
        if not encoded:
            raise InvalidRequest("image: give at least one image", param="image")
        _check_images(len(encoded), limits)
        images = [inspect_image(decode_base64(data, "image", limits), limits) for data in encoded]
        return self._task(images, EDIT_DEFAULTS, limits)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high", "original"] | None = None  # BAGEL sees every image whole


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    prompt_cache_breakpoint: dict | None = None  # OpenAI's prompt-cache hint: ignored


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    refusal: str | None = None  # an earlier assistant refusal: not shown to the model


class StreamOptions(_Strict):
    include_usage: bool | None = Field(None, description="a last chunk with the usage (and no choices)")
    include_obfuscation: bool | None = None  # OpenAI's padding against side channels: none is added here


class ChatCompletionRequest(ImageKnobs):
    """POST /v1/chat/completions: understanding, or images with `modalities` ["image"] (or
    ["text", "image"]): text-to-image from the text, editing when the messages carry images."""

    api: ClassVar[str] = "chat"

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    modalities: list[Literal["text", "image"]] | None = Field(
        None, description='["text"] (default): an answer; with "image": an image (and the thought, when thinking)')
    n: int = Field(1, ge=1, description="choices; up to the service's limits.max_n")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 or unset: greedy (BAGEL's default); "
                                      "also the thought's, in think mode")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling when temperature > 0")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the answer")
    do_sample: bool | None = Field(None, description="sample (default: when temperature > 0)")
    think: bool = Field(False, description="BAGEL think mode: reason in <think> tags before answering, "
                        "or plan before drawing")
    size: str | None = Field(None, description="image output: 'WIDTHxHEIGHT' or 'auto'")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > 4 or not all(strings):
            raise ValueError("at most 4 non-empty strings")
        return stop

    @property
    def wants_image(self) -> bool:
        return bool(self.modalities) and "image" in self.modalities

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_task(self, limits: Limits) -> tuple[ImageTask | TextTask, int]:
        """An ImageTask when images are asked for, else a TextTask; and the number of choices.
        Image-only knobs (size, guidance, steps, ...) do not affect text answers."""
        items = self._items(limits)
        _check_n(self.n, limits)
        max_new = self.max_completion_tokens or self.max_tokens
        sample = self.do_sample if self.do_sample is not None else bool(self.temperature)
        if self.wants_image:
            base = EDIT_DEFAULTS if any(not isinstance(i, str) for i in items) else ImageParams()
            thought = self.thought_params(limits, sample, self.temperature, max_new)
            return self.image_task(items, base, limits, self.size, thought), self.n
        max_new = max_new or self.max_think_tokens or min(CHAT_DEFAULTS.max_new_tokens, limits.max_new_tokens)
        if max_new > limits.max_new_tokens:
            raise InvalidRequest(f"max_tokens must be at most {limits.max_new_tokens}", param="max_tokens")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        params = replace(CHAT_DEFAULTS, max_new_tokens=max_new, do_sample=sample,
                         temperature=self.temperature or CHAT_DEFAULTS.temperature,
                         top_p=self.top_p or CHAT_DEFAULTS.top_p, stop=stop)
        return TextTask(items, params, self.think, self.seed), self.n

    def _items(self, limits: Limits) -> list:
        """Text and images in conversation order; within a message its images come first (BAGEL's
        order: an image, then what to do with it). Images are counted before any is inspected."""
        _check_images(sum(not isinstance(m.content, str) and p.type == "image_url"
                          for m in self.messages for p in m.content or []), limits)
        items: list = []
        for message in self.messages:
            parts = [ContentPart(type="text", text=message.content)] if isinstance(message.content, str) \
                else message.content or []
            texts, images = [], []
            for part in parts:
                if part.type == "text":
                    if part.text is None:
                        raise InvalidRequest("messages: a text part needs 'text'", param="messages")
                    if part.text.strip():
                        texts.append(part.text)
                else:
                    if part.image_url is None:
                        raise InvalidRequest("messages: an image_url part needs 'image_url'", param="messages")
                    images.append(inspect_image(decode_data_url(part.image_url.url, limits), limits, "image_url"))
            items += images + texts
        if not any(isinstance(i, str) for i in items):
            raise InvalidRequest("messages: no text given", param="messages")
        _check_text(" ".join(i for i in items if isinstance(i, str)), limits)
        return items


def decode_base64(data: str, field: str, limits: Limits) -> bytes:
    if data.startswith("data:"):
        return decode_data_url(data, limits)
    if len(data) > limits.max_upload_bytes * 4 // 3 + 4:
        raise InvalidRequest(f"{field}: larger than {limits.max_upload_bytes} bytes", param=field)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"{field}: not valid base64 ({e})", param=field) from e


def decode_data_url(url: str, limits: Limits) -> bytes:
    if not url.startswith("data:") or ";base64," not in url:
        raise InvalidRequest("image_url: only data URLs ('data:image/png;base64,...') are accepted", param="image_url")
    return decode_base64(url.split(";base64,", 1)[1], "image_url", limits)


def _parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise InvalidRequest(f"size must be 'WIDTHxHEIGHT' or 'auto', got {size!r}", param="size") from None
    return w, h


def _check_text(text: str, limits: Limits) -> None:
    if not text.strip():
        raise InvalidRequest("prompt is empty", param="prompt")
    if len(text) > limits.max_prompt_chars:
        raise InvalidRequest(f"prompt is longer than {limits.max_prompt_chars} characters", param="prompt")


def _check_n(n: int, limits: Limits) -> None:
    if n > limits.max_n:
        raise InvalidRequest(f"n must be at most {limits.max_n}", param="n")


def _check_images(count: int, limits: Limits) -> None:
    if count > limits.max_images:
        raise InvalidRequest(f"at most {limits.max_images} images per request, got {count}", param="image")
