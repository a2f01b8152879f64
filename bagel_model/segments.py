"""What one LLM call works on: a list of segments, each a block of tokens for one context.

A segment is text (causal), a ViT image block or a clean VAE image block (non-causal, appended to
the context's cache), or a noisy image block being denoised (non-causal, never cached). Image
blocks are `[<|vision_start|>, tokens..., <|vision_end|>]` at a single RoPE position. Segments of
one call are packed row after row; `PackedLayout` holds the per-token facts every stage needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

import torch
from torch import Tensor


def image_block_len(image_tokens: int) -> int:
    """Tokens of an image block: its image tokens plus the two markers around them."""
    return image_tokens + 2


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """`t` on `device`; a CPU tensor goes to a GPU through pinned memory without blocking the
    host (a plain copy from pageable memory waits for the GPU to drain first)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class SegmentKind(str, Enum):
    TEXT = "text"
    VIT = "vit"
    VAE = "vae"
    NOISE = "noise"


@dataclass(frozen=True)
class Segment:
    """One block of tokens for one context. Payload tensors are only needed by the first stage."""

    kind: SegmentKind
    context_id: str
    rope_pos: int
    num_tokens: int
    token_ids: Tensor | None = None  # TEXT: [n] int64
    embeds: Tensor | None = None  # VIT: [N, hidden] LLM input embeddings of the image tokens
    latents: Tensor | None = None  # VAE / NOISE: [h*w, patch_latent_dim] latent tokens
    grid: tuple[int, int] = (0, 0)  # VAE / NOISE: latent token grid (h, w)
    t: float = 0.0  # NOISE: flow time; VAE blocks use 0
    want_logits: bool = False  # TEXT: return the logits of the last token

    @staticmethod
    def text(context_id: str, token_ids: list[int] | Tensor, rope_pos: int, want_logits: bool = False) -> Segment:
        ids = torch.as_tensor(token_ids, dtype=torch.int64)
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError("a text segment needs at least one token id")
        return Segment(SegmentKind.TEXT, context_id, rope_pos, ids.numel(), token_ids=ids, want_logits=want_logits)

    @staticmethod
    def vit(context_id: str, embeds: Tensor, rope_pos: int) -> Segment:
        return Segment(SegmentKind.VIT, context_id, rope_pos, image_block_len(embeds.shape[0]), embeds=embeds)

    @staticmethod
    def vae(context_id: str, latents: Tensor, grid: tuple[int, int], rope_pos: int) -> Segment:
        _check_grid(latents, grid)
        return Segment(SegmentKind.VAE, context_id, rope_pos, image_block_len(latents.shape[0]), latents=latents,
                       grid=grid)

    @staticmethod
    def noise(context_id: str, latents: Tensor | None, grid: tuple[int, int], t: float, rope_pos: int) -> Segment:
        """`latents` None: the executor holds this image's latents from the previous step."""
        if latents is not None:
            _check_grid(latents, grid)
        elif grid[0] * grid[1] <= 0:
            raise ValueError(f"empty latent grid {grid}")
        return Segment(SegmentKind.NOISE, context_id, rope_pos, image_block_len(grid[0] * grid[1]), latents=latents,
                       grid=grid, t=t)

    @property
    def causal(self) -> bool:
        return self.kind is SegmentKind.TEXT

    @property
    def updates_cache(self) -> bool:
        return self.kind is not SegmentKind.NOISE

    @property
    def has_latents(self) -> bool:
        return self.kind in (SegmentKind.VAE, SegmentKind.NOISE)

    def image_rows(self, start: int) -> range:
        """Rows of the image tokens (between the markers) of this image block packed from row `start`."""
        return range(start + 1, start + self.num_tokens - 1)

    def metadata(self) -> Segment:
        """This segment without payload tensors (what stages after the first receive)."""
        return replace(self, token_ids=None, embeds=None, latents=None)


def _check_grid(latents: Tensor, grid: tuple[int, int]) -> None:
    if latents.ndim != 2 or latents.shape[0] != grid[0] * grid[1] or latents.shape[0] == 0:
        raise ValueError(f"latents {tuple(latents.shape)} do not fit the grid {grid}")


@dataclass
class PackedLayout:
    """Per-token facts of a packed call: RoPE positions, expert routing, segment row ranges."""

    segments: list[Segment]
    positions: Tensor  # [T] int64
    gen_rows: Tensor | None  # rows routed to the generation expert (None: none)
    und_rows: Tensor | None  # rows routed to the understanding expert (None: none)
    starts: list[int] = field(default_factory=list)

    @staticmethod
    def build(segments: list[Segment], device: torch.device) -> PackedLayout:
        if not segments:
            raise ValueError("an LLM call needs at least one segment")
        contexts = [s.context_id for s in segments if s.updates_cache]
        if len(contexts) != len(set(contexts)):
            raise ValueError("two cache-updating segments of one call target the same context")
        positions, gen, starts, row = [], [], [], 0
        for s in segments:
            starts.append(row)
            if s.kind is SegmentKind.TEXT:
                positions.append(torch.arange(s.rope_pos, s.rope_pos + s.num_tokens))
            else:
                positions.append(torch.full((s.num_tokens,), s.rope_pos))
            if s.has_latents:
                rows = s.image_rows(row)
                gen.append(torch.arange(rows.start, rows.stop))
            row += s.num_tokens
        is_gen = torch.zeros(row, dtype=torch.bool)
        if gen:
            is_gen[torch.cat(gen)] = True
        gen_rows = is_gen.nonzero().squeeze(1) if gen else None
        und_rows = (~is_gen).nonzero().squeeze(1) if not bool(is_gen.all()) else None
        return PackedLayout(
            segments, to_device(torch.cat(positions), device),
            None if gen_rows is None else to_device(gen_rows, device),
            None if und_rows is None else to_device(und_rows, device), starts,
        )

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def rows(self, i: int) -> slice:
        return slice(self.starts[i], self.starts[i] + self.segments[i].num_tokens)

    def route(self, x: Tensor, und_fn, gen_fn, *row_args: Tensor):
        """Apply `und_fn` to understanding rows and `gen_fn` to generation rows of x (row-wise
        functions, called as fn(x_rows, *row_args_rows), returning a tensor or a tuple of
        tensors with those rows; they may update their arguments in place). The majority expert
        runs on all rows, so its rows are never gathered or scattered; the minority's rows,
        gathered first, are then computed and written over the majority's output."""
        if self.gen_rows is None:
            return und_fn(x, *row_args)
        if self.und_rows is None:
            return gen_fn(x, *row_args)
        if self.gen_rows.numel() >= self.und_rows.numel():
            major, minor, rows = gen_fn, und_fn, self.und_rows
        else:
            major, minor, rows = und_fn, gen_fn, self.gen_rows
        minor_args = [x[rows], *(a[rows] for a in row_args)]
        out = major(x, *row_args)
        sub = minor(*minor_args)
        for o, s in zip(*((out, sub) if isinstance(out, tuple) else ((out,), (sub,)))):
            o[rows] = s
        return out
