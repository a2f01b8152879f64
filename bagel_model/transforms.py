"""Image loading and preprocessing for the VAE and ViT inputs (spec §6).

Contract:
  * ``open_image(bytes | path)`` returns a fully decoded PIL image or raises :class:`InvalidImage`;
    ``read_header`` opens one lazily (size and format, no pixels decoded).
  * ``to_rgb`` composites images with transparency onto white, else converts to RGB.
  * ``ResizeRule(max_size, min_size, stride, max_pixels)`` reproduces the official
    "max long edge / min short edge / stride" resize bit-exactly (Pillow bicubic).
  * ``to_tensor(img) -> float32 [3, H, W]`` in [-1, 1]: ``(uint8 / 255 - 0.5) / 0.5``.
  * ``vit_patches(pixels, p, G)`` -> packed ViT patches (row-major, (row, col, channel) inside a patch)
    and their position ids ``r*G + c``.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import InvalidRequest
from .latents import patchify

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


class InvalidImage(InvalidRequest):
    """The input is not a decodable image, or is too large to decode."""


def read_header(source: io.BytesIO | io.BufferedReader, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                formats: tuple[str, ...] | None = None) -> Image.Image:
    """Open an image lazily: format, size and mode from its header, no pixel data decoded.

    Raises :class:`InvalidImage` when the data is not an image (of one of ``formats``, if given)
    or declares more than ``max_pixels`` pixels. Our limit is the one reported, also for images
    beyond Pillow's own decompression-bomb limit.
    """
    try:
        img = Image.open(source, formats=formats)
    except Image.DecompressionBombError:
        raise InvalidImage(f"larger than the limit of {max_pixels} pixels") from None
    except Exception:  # Pillow raises many exception types on malformed headers; its messages name its internals
        kinds = f" ({', '.join(formats)})" if formats else ""
        raise InvalidImage(f"not a decodable image{kinds}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise InvalidImage(f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    if width < 1 or height < 1:
        raise InvalidImage(f"{width}x{height} pixels")
    return img


def open_image(data: bytes | str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               formats: tuple[str, ...] | None = None) -> Image.Image:
    """Open and fully decode an image from bytes or a file path.

    The header is checked (`read_header`) before any pixel data is decoded. Raises
    :class:`InvalidImage` for undecodable or truncated data and for images above ``max_pixels``;
    a missing file raises the usual ``OSError``.
    """
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else open(data, "rb")
    with source:
        img = read_header(source, max_pixels, formats)
        try:
            img.load()
        except Exception as e:  # truncated or corrupt pixel data
            raise InvalidImage(f"image data could not be decoded ({type(e).__name__}: {e})") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of ``img``; pixels with transparency are alpha-composited onto white."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _snap(value: float, stride: int) -> int:
    return max(stride, round(value / stride) * stride)


@dataclass(frozen=True)
class ResizeRule:
    """Resize so the long edge is <= max_size, the short edge >= min_size, both multiples of stride."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 1806336

    def _apply(self, w: int, h: int, scale: float) -> tuple[int, int]:
        # Python round() (half to even) twice: once on the scaled size, once when snapping to the stride.
        return _snap(round(w * scale), self.stride), _snap(round(h * scale), self.stride)

    def target_size(self, w: int, h: int) -> tuple[int, int]:
        """Output (width, height) for an input of (w, h)."""
        scale = min(self.max_size / max(w, h), 1.0)
        scale = max(scale, self.min_size / min(w, h))
        w, h = self._apply(w, h, scale)
        if w * h > self.max_pixels:
            w, h = self._apply(w, h, self.max_pixels / (w * h))
        if max(w, h) > self.max_size:
            w, h = self._apply(w, h, self.max_size / max(w, h))
        return w, h

    def __call__(self, img: Image.Image) -> Image.Image:
        """Bicubic resize to :meth:`target_size`; an unchanged size returns a copy."""
        size = self.target_size(*img.size)
        if size == img.size:
            return img.copy()
        return img.resize(size, Image.BICUBIC)


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode}")
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (x - 0.5) / 0.5


def vit_patches(pixels: Tensor, patch_size: int, max_patches_per_side: int) -> tuple[Tensor, Tensor]:
    """[3, H, W] -> (patches [N, p*p*3], position_ids [N] int64), patches in row-major grid order."""
    _, height, width = pixels.shape
    rows, cols = height // patch_size, width // patch_size
    if height % patch_size or width % patch_size or max(rows, cols) > max_patches_per_side:
        raise ValueError(
            f"image {height}x{width} must be a multiple of {patch_size} with at most "
            f"{max_patches_per_side} patches per side"
        )
    patches = patchify(pixels.unsqueeze(0), patch_size)
    position_ids = (torch.arange(rows)[:, None] * max_patches_per_side + torch.arange(cols)).flatten()
    return patches, position_ids
