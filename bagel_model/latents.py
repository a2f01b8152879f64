"""Packing of VAE latents into tokens and conversion of decoded images to pixels (spec §4.8, §5.6).

Contract:
  * ``patchify(z [1, C, p*h, p*w], p) -> [h*w, p*p*C]``: tokens row-major over the (h, w) grid, each
    vector indexed ``(row_offset*p + col_offset)*C + channel``.
  * ``unpatchify`` is its exact inverse.
  * ``to_uint8(decoded [1, 3, H, W]) -> uint8 [H, W, 3]`` truncates ``clamp(0.5*y + 0.5, 0, 1) * 255``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def patchify(z: Tensor, p: int = 2) -> Tensor:
    """[1, C, p*h, p*w] -> [h*w, p*p*C] (see module docstring for the layout)."""
    n, c, height, width = z.shape
    if n != 1 or height % p or width % p:
        raise ValueError(f"expected [1, C, H, W] with H, W multiples of {p}, got {tuple(z.shape)}")
    h, w = height // p, width // p
    return z.reshape(c, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, p * p * c)


def unpatchify(x: Tensor, h: int, w: int, p: int = 2, channels: int = 16) -> Tensor:
    """[h*w, p*p*C] -> [1, C, p*h, p*w]; inverse of :func:`patchify`."""
    if x.shape != (h * w, p * p * channels):
        raise ValueError(f"expected [{h * w}, {p * p * channels}], got {tuple(x.shape)}")
    return x.reshape(h, w, p, p, channels).permute(4, 0, 2, 1, 3).reshape(1, channels, h * p, w * p)


def to_uint8(decoded: Tensor) -> Tensor:
    """[1, 3, H, W] decoder output -> uint8 [H, W, 3] RGB; computed in float32, truncating."""
    if decoded.dim() != 4 or decoded.shape[0] != 1:
        raise ValueError(f"expected [1, C, H, W], got {tuple(decoded.shape)}")
    y = (decoded[0].float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255
    return y.to(torch.uint8)
