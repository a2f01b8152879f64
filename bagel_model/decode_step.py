"""Fast single-token decoding through one stage: static K/V slots and CUDA graphs.

A decode call (one text token per context, logits wanted) runs row i of a fixed-size batch for
slot i of the KV cache; rows of slots that take no part write to a scratch column and are
ignored. Shapes depend only on (batch bucket, attention window bucket), so on CUDA each pair is
captured once as a graph and replayed: no per-token allocation, no per-kernel launch cost. The
same code runs eagerly on the CPU.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kv_cache import MIN_CAPACITY, KVCache, _bucket
from .layers import rope_cos_sin
from .model import BagelStage
from .segments import Segment, SegmentKind, to_device


class DecodeStep:
    def __init__(self, stage: BagelStage, cache: KVCache, graphs: bool | None = None):
        self.stage, self.cache = stage, cache
        self.device = stage.device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        n = cache.max_slots
        # Static inputs, one row each: token ids, RoPE positions, K/V write columns, and the
        # slots of the call's segments in order (first entries).
        self._inputs = torch.zeros(4, n, dtype=torch.int64, device=self.device)
        self._ids, self._positions, self._write = self._inputs[0], self._inputs[1], self._inputs[2]
        self._hidden = torch.zeros(n, stage.config.llm.hidden_size, dtype=stage.dtype, device=self.device)
        self._captured: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}

    @staticmethod
    def accepts(segments: list[Segment]) -> bool:
        """Whether this call is a decode step: one token per distinct context, logits wanted."""
        return all(s.kind is SegmentKind.TEXT and s.num_tokens == 1 and s.want_logits for s in segments) \
            and len({s.context_id for s in segments}) == len(segments)

    @torch.inference_mode()
    def __call__(self, segments: list[Segment], hidden: Tensor | None = None) -> Tensor | list[Tensor] | None:
        """Hidden states [B, hidden] for the next stage, or per-segment logits on the last
        stage; None (nothing done) when the contexts do not fit the slots."""
        ids = [s.context_id for s in segments]
        slots = self.cache.slot_in(ids, extra=1)
        if slots is None:
            return None
        storage = self.cache.storage
        lengths = [self.cache.length(c) for c in ids]
        window = min(_bucket(max(lengths) + 1, MIN_CAPACITY), storage.capacity)
        n = self.cache.max_slots
        host = [[0] * n, [0] * n, [storage.capacity] * n, slots + [0] * (n - len(slots))]
        for slot, seg, length in zip(slots, segments, lengths):  # other rows write to the scratch column
            host[0][slot] = int(seg.token_ids[0]) if self.stage.stage.is_first else 0
            host[1][slot], host[2][slot] = seg.rope_pos, length
        self._inputs.copy_(to_device(torch.tensor(host), self.device))  # one upload, no host sync
        rows = self._inputs[3, :len(slots)]
        if not self.stage.stage.is_first:
            self._hidden[rows] = hidden.to(self.device, self.stage.dtype)
        out = self._run(storage.slots, window)[rows]
        self.cache.advance(ids)
        return list(out) if self.stage.stage.is_last else out

    def _run(self, batch: int, window: int) -> Tensor:
        if not self.graphs:
            return self._compute(batch, window)
        key = (batch, window, self.cache.storage.version)
        if key not in self._captured:
            if any(k[2] != key[2] for k in self._captured):
                self._captured.clear()  # the slot buffers moved: old graphs point at freed memory
            self._captured[key] = self._capture(batch, window)
        graph, out = self._captured[key]
        graph.replay()
        return out

    def _capture(self, batch: int, window: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Warm-up on a side stream first (lazy inits, compiled kernels). It writes the same K/V
        # the replay will write, so running it is harmless.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._compute(batch, window)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._compute(batch, window)
        return graph, out

    def _compute(self, batch: int, window: int) -> Tensor:
        """The step on the static inputs' first `batch` rows (reads `window` cache columns)."""
        stage, llm, storage = self.stage, self.stage.config.llm, self.cache.storage
        body = stage.language_model.model
        x = body.embed_tokens(self._ids[:batch]) if stage.stage.is_first else self._hidden[:batch]
        write = self._write[:batch]
        cos, sin = rope_cos_sin(self._positions[:batch], llm.head_dim, llm.rope_theta, x.dtype)
        visible = torch.arange(window, device=self.device)[None, :] <= write[:, None]
        bias = torch.zeros(visible.shape, device=self.device).masked_fill(~visible, float("-inf"))
        rows = torch.arange(batch, device=self.device)
        pending = torch.zeros_like(x)
        for i, layer in body.layers.items():
            x, pending = layer.decode(x, pending, cos, sin, storage.k[int(i)][:batch], storage.v[int(i)][:batch],
                                      rows, write, bias)
        if not stage.stage.is_last:
            return x + pending
        return stage.language_model.lm_head(stage.kernels.add_rms_norm(x, pending, body.norm.weight, body.norm.eps)[1])
