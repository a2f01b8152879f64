"""Typed requests and results of the application, for Python callers of its Ray handle.

    handle = serve.get_app_handle("bagel")
    out = handle.generate.remote(ImageTask(items=["a red fox"], params=ImageParams(num_timesteps=30))).result()
    open("fox.png", "wb").write(out.data)  # PNG unless `output` says otherwise

Items are strings or images (PIL images or encoded image bytes), in conversation order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from pipelines.params import ImageParams, TextParams

from .image_encoding import OutputFormat

Item = str | bytes | Image.Image


@dataclass
class ImageTask:
    """Text-to-image ([prompt]), editing ([image, prompt]) or any interleaving."""

    items: list[Item]
    params: ImageParams = field(default_factory=ImageParams)
    think: bool = False
    text_params: TextParams = field(default_factory=TextParams)  # for the thought
    seed: int | None = None
    negative_prompt: str | None = None  # the text-free guidance branch's context (pipelines.tasks)
    output: OutputFormat = field(default_factory=OutputFormat)  # how the image is encoded
    previews: int = 0  # previews to stream (events of type "partial_image"), at most 3


@dataclass
class ImageOutput:
    data: bytes  # the image, encoded as `output_format` says
    width: int
    height: int
    seed: int
    thought: str | None = None
    output_format: str = "png"
    prompt_tokens: int = 0  # the prompt's text and image tokens, as the model saw them
    prompt_image_tokens: int = 0  # of those, the input images'
    cached_tokens: int = 0  # of those, reused from the prefix cache
    output_tokens: int = 0  # the thought's tokens and the image's latent tokens


@dataclass
class TextTask:
    """Understanding: answer about the items."""

    items: list[Item]
    params: TextParams = field(default_factory=TextParams)
    think: bool = False
    seed: int | None = None


@dataclass
class TextOutput:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int = 0  # the prompt's text and image tokens, as the model saw them
    cached_tokens: int = 0  # of those, reused from the prefix cache
