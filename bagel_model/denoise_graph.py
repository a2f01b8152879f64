"""Denoising forwards as replayed CUDA graphs.

Every step of one image runs the same forward: the same branches (contexts), the same token
count, the same cached K/V read; only the input hidden states change. So the second time a
call with those facts arrives it is captured once as a graph, and later steps only copy their
input into the graph's static buffer and replay it: the host enqueues a whole forward at once
instead of launching its ~1,000 kernels one by one from Python (which is what bounds small
images; bench/results/profile_denoise_*.json has the numbers), and the GPU runs them back to
back. Same kernels, same numbers as the eager forward (checked by `bench/check_fastpaths.py`).

A graph holds references to the K/V tensors it reads, so they cannot be freed under it; a call
whose contexts have other K/V tensors than at the capture (same lengths) runs eagerly and is
captured again. Live graphs share one memory pool (their intermediates are dead between
replays; outputs are cloned before anything else runs); a new pool starts once they are all
gone. Graphs are dropped when their contexts are freed; beyond `max_graphs` live graphs, calls
with new keys run eagerly.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .kv_cache import KVCache
from .segments import PackedLayout, Segment, SegmentKind

Outputs = Tensor | list[Tensor | None]
Forward = Callable[[Tensor, PackedLayout], Outputs]
# capture(fn, pool) -> (replay, outputs): records fn() so that replay() recomputes it into
# `outputs`; `pool` is shared by the graphs captured into it.
Capture = Callable[[Callable[[], Outputs], tuple], tuple[Callable[[], None], Outputs]]


class CudaCapture:
    """Captures on one side stream of its own, which waits for the work already queued: no
    device sync as in `torch.cuda.graph` (the previous step keeps the GPU busy while the host
    captures). One stream for all captures, because the allocator reuses a freed block of a
    shared pool only for allocations on the stream that freed it."""

    def __init__(self):
        self.stream = torch.cuda.Stream()

    def __call__(self, fn: Callable[[], Outputs], pool: tuple) -> tuple[Callable[[], None], Outputs]:
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                out = fn()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(self.stream)
        return graph.replay, out


@dataclass
class _Graph:
    replay: Callable[[], None]
    hidden: Tensor  # static input
    outputs: Outputs  # static outputs
    layout: PackedLayout  # its device tensors are read by the graph
    kv: list[tuple[Tensor, Tensor] | None]  # the cached K/V it reads, per (segment, layer)


class DenoiseGraphs:
    def __init__(self, forward: Forward, cache: KVCache, device: torch.device, max_graphs: int = 24,
                 capture: Capture | None = None, new_pool: Callable[[], tuple] = torch.cuda.graph_pool_handle):
        """`forward(hidden, layout)`: the stage's eager forward (hidden states or heads).
        `max_graphs`: graphs kept; calls with new keys beyond that run eagerly (an image needs
        one or two graphs per stage in process, one per CFG branch when branches travel as
        separate micro-batches: 24 covers 8 concurrent edits). `capture` (default
        `CudaCapture`) and `new_pool` are replaceable for tests."""
        self.forward, self.cache, self.device, self.max_graphs = forward, cache, device, max_graphs
        self.capture, self.new_pool = capture or CudaCapture(), new_pool
        self._pool: tuple | None = None  # memory pool of the live graphs
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: set[tuple] = set()  # keys run once eagerly (which warms up their kernels)
        self.enabled = True  # off after a capture failed other than for memory

    @staticmethod
    def accepts(segments: list[Segment]) -> bool:
        """Whether this call is a denoising forward (noise blocks only, caches read only)."""
        return all(s.kind is SegmentKind.NOISE for s in segments)

    def __call__(self, segments: list[Segment], hidden: Tensor) -> Outputs:
        key = tuple((s.context_id, self.cache.length(s.context_id), s.rope_pos, s.grid) for s in segments) \
            + (tuple(hidden.shape), hidden.dtype)
        graph = self._graphs.get(key)
        if graph is not None and not all(a is b for a, b in zip(graph.kv, self._kv(segments))):
            del self._graphs[key]  # a context's cache was replaced since the capture: start over
            self._seen.discard(key)
            graph = None
        if graph is None and key in self._seen and self.enabled and len(self._graphs) < self.max_graphs:
            graph = self._capture(key, segments, hidden)
        if graph is None:
            self._seen.add(key)
            return self.forward(hidden, PackedLayout.build(segments, self.device))
        graph.hidden.copy_(hidden)
        graph.replay()
        out = graph.outputs
        return out.clone() if isinstance(out, Tensor) else [None if o is None else o.clone() for o in out]

    def forget(self, context_ids: list[str]) -> None:
        """Drop the graphs and keys of calls that read any of these contexts."""
        gone = set(context_ids)
        for key in [k for k in self._graphs if _contexts(k) & gone]:
            del self._graphs[key]
        self._seen = {k for k in self._seen if not _contexts(k) & gone}

    def __len__(self) -> int:
        return len(self._graphs)

    def _capture(self, key: tuple, segments: list[Segment], hidden: Tensor) -> _Graph | None:
        """A new graph for this call, or None where capture failed (then the call runs eagerly:
        an out-of-memory only this time, anything else from now on)."""
        if not self._graphs:  # a pool cannot be captured into again once its graphs are gone
            self._pool = self.new_pool()
        static = hidden.clone()
        layout = PackedLayout.build(segments, self.device)
        kv = self._kv(segments)
        try:
            replay, outputs = self.capture(lambda: self.forward(static, layout), self._pool)
        except torch.OutOfMemoryError:
            return None
        except RuntimeError as e:
            warnings.warn(f"denoising graph capture failed, running eagerly from now on: {e}")
            self.enabled = False
            return None
        graph = self._graphs[key] = _Graph(replay, static, outputs, layout, kv)
        return graph

    def _kv(self, segments: list[Segment]) -> list[tuple[Tensor, Tensor] | None]:
        return [self.cache.get(s.context_id, layer) for s in segments for layer in self.cache.layers]


def _contexts(key: tuple) -> set[str]:
    return {part[0] for part in key[:-2]}
