"""How an image goes back to the client: PNG, JPEG or WebP bytes (OpenAI's `output_format` and
`output_compression`).

`output_compression` is OpenAI's 0-100 setting for the lossy formats, default 100: here the
JPEG / WebP quality (100 = the least compression, the best image). PNG is lossless, so it takes
only that default (anything else is a 400); it is written with zlib level 1, which is ~0.1 s
faster than Pillow's default at 1024x1024 and a few percent larger.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from bagel_model.errors import InvalidRequest

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
DEFAULT_COMPRESSION = 100  # OpenAI's default
PNG_ZLIB_LEVEL = 1


@dataclass(frozen=True)
class OutputFormat:
    format: str = "png"  # "png", "jpeg" or "webp"
    compression: int | None = None  # jpeg / webp quality, 0-100; None: 100

    def validate(self) -> OutputFormat:
        if self.format not in MEDIA_TYPES:
            raise InvalidRequest(f"output_format must be one of {sorted(MEDIA_TYPES)}, got {self.format!r} "
                                 "(BAGEL draws raster images; no GIF or SVG)", param="output_format")
        if self.compression is not None:
            if isinstance(self.compression, bool) or not isinstance(self.compression, int) \
                    or not 0 <= self.compression <= 100:
                raise InvalidRequest(f"output_compression must be an integer in [0, 100], got {self.compression!r}",
                                     param="output_compression")
            if self.format == "png" and self.compression != DEFAULT_COMPRESSION:
                raise InvalidRequest("output_compression applies to jpeg and webp; png is lossless (only the "
                                     f"default {DEFAULT_COMPRESSION} is accepted)", param="output_compression")
        return self

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


def encode_image(image: Image.Image, output: OutputFormat) -> bytes:
    buf = io.BytesIO()
    if output.format == "png":
        image.save(buf, format="PNG", compress_level=PNG_ZLIB_LEVEL)
    else:
        quality = DEFAULT_COMPRESSION if output.compression is None else output.compression
        image.convert("RGB").save(buf, format=output.format.upper(), quality=quality)
    return buf.getvalue()
