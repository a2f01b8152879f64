"""A request's inputs, checked before any work, for HTTP and handle callers alike.

An encoded image is read only as far as its header (format, width, height) and checked against
the configured limits: format, pixels per image, aspect ratio, images and pixels per request. Its
pixels are decoded later, on the request's worker thread, once admission has reserved memory
for them (`decoded_bytes`); a decompression bomb is refused from its header, before any decode.
Text must be valid Unicode (a lone surrogate, which JSON cannot carry but a handle caller can
send, would fail in the tokenizer).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from bagel_model.errors import InvalidRequest
from bagel_model.transforms import InvalidImage, open_image, read_header

from .args import Limits

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what the service decodes; no plugin that runs tools
BYTES_PER_PIXEL = 8  # Pillow holds RGB(A) as 4 bytes a pixel, and the pipeline makes one RGB copy (to_rgb)


@dataclass(frozen=True)
class EncodedImage:
    """An input image whose header passed the limits; `decode` on a worker thread."""

    data: bytes
    size: tuple[int, int]
    max_pixels: int

    def decode(self) -> Image.Image:
        return open_image(self.data, self.max_pixels, FORMATS)


def inspect_image(data: bytes, limits: Limits, field: str = "image") -> EncodedImage:
    """Check an encoded image from its header; nothing is decoded."""
    if len(data) > limits.max_upload_bytes:
        raise InvalidImage(f"{field}: larger than {limits.max_upload_bytes} bytes", param=field)
    try:
        with io.BytesIO(data) as source:
            size = read_header(source, limits.max_image_pixels, FORMATS).size
        _check_aspect(size, limits)
    except InvalidImage as e:
        raise InvalidImage(f"{field}: {e}", param=field) from None
    return EncodedImage(data, size, limits.max_image_pixels)


def checked_items(items: list, limits: Limits) -> list:
    """The items with encoded image bytes inspected (`EncodedImage`), after checking every text
    and image and the request's image count and total pixels. Raises `InvalidRequest`."""
    images = sum(not isinstance(i, str) for i in items)
    if images > limits.max_images:
        raise InvalidRequest(f"at most {limits.max_images} images per request, got {images}")
    out = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            _check_unicode(item, index)
        elif isinstance(item, (bytes, bytearray)):
            item = inspect_image(bytes(item), limits, f"item {index}")
        elif isinstance(item, (EncodedImage, Image.Image)):
            w, h = item.size
            if w * h > limits.max_image_pixels:
                raise InvalidImage(f"item {index}: {w}x{h} = {w * h} pixels, over the limit of {limits.max_image_pixels}")
            try:
                _check_aspect(item.size, limits)
            except InvalidImage as e:
                raise InvalidImage(f"item {index}: {e}") from None
        else:
            raise InvalidRequest(f"item {index}: expected text, image bytes or a PIL image, got {type(item).__name__}")
        out.append(item)
    total = sum(i.size[0] * i.size[1] for i in out if not isinstance(i, str))
    if total > limits.max_request_image_pixels:
        raise InvalidRequest(f"the images have {total} pixels together; at most {limits.max_request_image_pixels} "
                             "are accepted per request")
    return out


def decoded_bytes(items: list) -> int:
    """Estimated memory the items' images take once decoded (and converted) by the pipeline."""
    return sum(i.size[0] * i.size[1] * BYTES_PER_PIXEL for i in items if not isinstance(i, str))


def decoded(items: list) -> list:
    """The items with every `EncodedImage` decoded (worker thread)."""
    return [i.decode() if isinstance(i, EncodedImage) else i for i in items]


def _check_aspect(size: tuple[int, int], limits: Limits) -> None:
    w, h = size
    if max(w, h) > limits.max_aspect_ratio * min(w, h):
        raise InvalidImage(f"aspect ratio {w}x{h} exceeds {limits.max_aspect_ratio}:1")


def _check_unicode(text: str, index: int) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"item {index}: not valid Unicode (a lone surrogate at character {e.start})") from None
