"""The HTTP API's request models (OpenAI shapes plus BAGEL's knobs) and their conversion to
`ImageTask` / `TextTask`. Pydantic lives here and in args.py only."""
from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bagel_model.errors import InvalidRequest
from bagel_model.transforms import open_image
from pipelines.params import EDIT_DEFAULTS, ImageParams, TextParams

from .api import ImageTask, TextTask
from .args import Limits


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BagelImageOptions(_Strict):
    """BAGEL's sampler knobs (official names); unset fields take the task's defaults."""

    cfg_text_scale: float | None = Field(None, description="text guidance scale (1 = off)")
    cfg_img_scale: float | None = Field(None, description="image guidance scale (1 = off)")
    cfg_interval: tuple[float, float] | None = Field(None, description="guidance only for start < t <= end")
    timestep_shift: float | None = Field(None, description="shift of the time schedule towards noise")
    num_timesteps: int | None = Field(None, description="schedule points (model evaluations + 1)")
    cfg_renorm_min: float | None = Field(None, description="lower clamp of the renorm factor (1 = no renorm)")
    cfg_renorm_type: Literal["global", "channel", "text_channel"] | None = None
    cfg_refresh_interval: int | None = Field(
        None, description="APPROXIMATE when > 1 (faster): the guidance branches run every k-th guided step only")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    think: bool = Field(False, description="plan in text first (the thought is returned as revised_prompt)")
    max_think_tokens: int | None = Field(None, ge=1, description="longest thought")
    stream: bool = Field(False, description="server-sent events: progress per step, then the image")

    def image_params(self, base: ImageParams, limits: Limits, size: str | None) -> ImageParams:
        overrides = {k: v for k, v in self.model_dump(include=set(ImageParams.__dataclass_fields__)).items()
                     if v is not None}
        if overrides.get("num_timesteps", 0) > limits.max_num_timesteps:
            raise InvalidRequest(f"num_timesteps must be at most {limits.max_num_timesteps}")
        if size is not None:
            overrides["width"], overrides["height"] = _parse_size(size)
        return base.__class__(**{**base.__dict__, **overrides})

    def think_params(self, limits: Limits) -> TextParams:
        n = self.max_think_tokens or 1000
        if n > limits.max_new_tokens:
            raise InvalidRequest(f"max_think_tokens must be at most {limits.max_new_tokens}")
        return TextParams(max_new_tokens=n)


class ImageGenerationRequest(BagelImageOptions):
    """POST /v1/images/generations"""

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="'WIDTHxHEIGHT', multiples of 16; default the model's largest square")
    response_format: Literal["b64_json"] = "b64_json"
    quality: str | None = None  # accepted for OpenAI clients, ignored
    style: str | None = None  # accepted for OpenAI clients, ignored
    user: str | None = None

    def to_task(self, limits: Limits) -> tuple[ImageTask, int]:
        _check_text(self.prompt, limits)
        _check_n(self.n, limits)
        params = self.image_params(ImageParams(), limits, self.size)
        return ImageTask([self.prompt], params, self.think, self.think_params(limits), self.seed), self.n


class ImageEditRequest(BagelImageOptions):
    """POST /v1/images/edits (JSON form; the multipart form is converted into this)."""

    prompt: str = Field(min_length=1)
    image: str = Field(min_length=1, description="base64 or a data URL")
    model: str | None = None
    n: int = Field(1, ge=1)
    response_format: Literal["b64_json"] = "b64_json"
    size: str | None = None  # must be unset: the output has the input's size
    user: str | None = None

    def to_task(self, limits: Limits) -> tuple[ImageTask, int]:
        _check_text(self.prompt, limits)
        _check_n(self.n, limits)
        if self.size is not None:
            raise InvalidRequest("size: edits keep the input image's size; leave size unset")
        image = decode_image(decode_base64(self.image, "image", limits), limits)
        params = self.image_params(EDIT_DEFAULTS, limits, None)
        return ImageTask([image, self.prompt], params, self.think, self.think_params(limits), self.seed), self.n


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class ChatCompletionRequest(_Strict):
    """POST /v1/chat/completions"""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 or unset: greedy (BAGEL's default)")
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    think: bool = Field(False, description="BAGEL think mode: reason in <think> tags before answering")

    def to_task(self, limits: Limits) -> TextTask:
        items: list = []
        for message in self.messages:
            parts = [ContentPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
            for part in parts:
                if part.type == "text":
                    if part.text is None:
                        raise InvalidRequest("messages: a text part needs 'text'")
                    if part.text.strip():
                        items.append(part.text)
                else:
                    if part.image_url is None:
                        raise InvalidRequest("messages: an image_url part needs 'image_url'")
                    items.append(decode_image(decode_data_url(part.image_url.url, limits), limits))
        if not any(isinstance(i, str) for i in items):
            raise InvalidRequest("messages: no text given")
        if sum(not isinstance(i, str) for i in items) > limits.max_images:
            raise InvalidRequest(f"messages: at most {limits.max_images} images per request")
        _check_text(" ".join(i for i in items if isinstance(i, str)), limits)
        max_new = self.max_completion_tokens or self.max_tokens or 512
        if max_new > limits.max_new_tokens:
            raise InvalidRequest(f"max_tokens must be at most {limits.max_new_tokens}")
        temperature = self.temperature or 0.0
        params = TextParams(max_new_tokens=max_new, do_sample=temperature > 0, temperature=temperature or 0.3)
        return TextTask(items, params, self.think, self.seed)


def decode_base64(data: str, field: str, limits: Limits) -> bytes:
    if data.startswith("data:"):
        return decode_data_url(data, limits)
    if len(data) > limits.max_upload_bytes * 4 // 3 + 4:
        raise InvalidRequest(f"{field}: larger than {limits.max_upload_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"{field}: not valid base64 ({e})") from e


def decode_data_url(url: str, limits: Limits) -> bytes:
    if not url.startswith("data:") or ";base64," not in url:
        raise InvalidRequest("image_url: only data URLs ('data:image/png;base64,...') are accepted")
    return decode_base64(url.split(";base64,", 1)[1], "image_url", limits)


def decode_image(data: bytes, limits: Limits):
    if len(data) > limits.max_upload_bytes:
        raise InvalidRequest(f"image: larger than {limits.max_upload_bytes} bytes")
    image = open_image(data, max_pixels=limits.max_image_pixels)
    w, h = image.size
    if max(w, h) > limits.max_aspect_ratio * min(w, h):
        raise InvalidRequest(f"image: aspect ratio {w}x{h} exceeds {limits.max_aspect_ratio}:1")
    return image


def _parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise InvalidRequest(f"size must be 'WIDTHxHEIGHT', got {size!r}") from None
    return w, h


def _check_text(text: str, limits: Limits) -> None:
    if not text.strip():
        raise InvalidRequest("prompt is empty")
    if len(text) > limits.max_prompt_chars:
        raise InvalidRequest(f"prompt is longer than {limits.max_prompt_chars} characters")


def _check_n(n: int, limits: Limits) -> None:
    if n > limits.max_n:
        raise InvalidRequest(f"n must be at most {limits.max_n}")
