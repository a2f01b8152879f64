"""Blocks: what a context is made of, described before anything runs.

A block has a `key` (its entry in `Context.history`: text ids, or an image's content hash taken
after the resize and transform, plus for a VAE block the hash of its posterior noise) and makes
its `Segment` only when asked, running the ViT or VAE encoder then. Contexts are built from
block lists, so the prefix cache (pipelines/prefix_cache.py) can find the longest cached prefix
of a context by its keys alone and skip the encoders of the images in it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image
from torch import Tensor

from bagel_model.segments import Segment


@dataclass(eq=False)
class Block:
    key: tuple  # ("text", ids) | ("vit", image hash) | ("vae", image hash, noise hash)
    _make: Callable[[str, int], Segment]

    @property
    def is_image(self) -> bool:
        return self.key[0] != "text"

    def segment(self, context_id: str, rope_pos: int) -> Segment:
        """The block's segment for a context at `rope_pos` (its encoder runs on the first call)."""
        return self._make(context_id, rope_pos)


def text_block(ids: list[int]) -> Block:
    """A text block: its ids already carry the <|im_start|> ... <|im_end|> markers."""
    ids = tuple(ids)
    return Block(("text", ids), lambda context_id, pos: Segment.text(context_id, list(ids), pos))


def vit_block(image: Image.Image, encode: Callable[[], Tensor]) -> Block:
    """A ViT block of a ViT-resized image; `encode()` gives its embeddings [N, hidden]."""
    embeds = _Once(encode)
    return Block(("vit", image_digest(image)), lambda context_id, pos: Segment.vit(context_id, embeds(), pos))


def vae_block(image: Image.Image, noise: Tensor, grid: tuple[int, int], encode: Callable[[], Tensor]) -> Block:
    """A clean VAE block of a VAE-resized image encoded with posterior `noise`; `encode()` gives
    its latent tokens [h*w, patch_latent_dim]."""
    latents = _Once(encode)
    key = ("vae", image_digest(image), tensor_digest(noise))
    return Block(key, lambda context_id, pos: Segment.vae(context_id, latents(), grid, pos))


def image_digest(image: Image.Image) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def tensor_digest(t: Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _Once:
    """A thunk evaluated at most once."""

    def __init__(self, make: Callable[[], Tensor]):
        self._make: Callable[[], Tensor] | None = make
        self._value: Tensor | None = None

    def __call__(self) -> Tensor:
        if self._make is not None:
            self._value, self._make = self._make(), None
        return self._value
