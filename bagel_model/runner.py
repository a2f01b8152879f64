"""`StageRunner`: one stage's weights with the KV caches of its layers, running micro-batches.

The first stage embeds the segments, later ones take the previous stage's hidden states; the last
returns per-segment outputs (`BagelStage.heads`), the others hidden states. Decode steps take the
static-slot fast path of `decode_step.py` whenever their contexts fit its slots; on CUDA,
denoising forwards are replayed as CUDA graphs (`denoise_graph.py`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .decode_step import DecodeStep
from .denoise_graph import DenoiseGraphs
from .kv_cache import KVCache
from .model import BagelStage
from .segments import PackedLayout, Segment


class StageRunner:
    def __init__(self, stage: BagelStage, markers: tuple[int, int], *, decode_slots: int = 8,
                 graphs: bool | None = None):
        """`markers`: the <|vision_start|> and <|vision_end|> token ids; `decode_slots`: how many
        contexts the decode fast path holds at once (0 turns it off); `graphs`: capture decode
        steps and denoising forwards as CUDA graphs (default: on CUDA devices)."""
        self.stage, self.markers = stage, markers
        self.cache = KVCache(stage.stage.layers, max_slots=decode_slots)
        graphs = stage.device.type == "cuda" if graphs is None else graphs
        self.decode_step = DecodeStep(stage, self.cache, graphs) if decode_slots else None
        self.denoise_graphs = DenoiseGraphs(self._forward, self.cache, stage.device) if graphs else None

    @property
    def device(self) -> torch.device:
        return self.stage.device

    @torch.inference_mode()
    def run(self, segments: list[Segment], hidden: Tensor | None = None) -> Tensor | list[Tensor | None]:
        """Hidden states [T, hidden] for the next stage, or the last stage's per-segment outputs."""
        if self.decode_step is not None and DecodeStep.accepts(segments):
            out = self.decode_step(segments, hidden)
            if out is not None:
                return out
        if self.stage.stage.is_first:
            hidden = self.stage.embed(segments, *self.markers)
        hidden = hidden.to(self.device)
        if self.denoise_graphs is not None and DenoiseGraphs.accepts(segments):
            return self.denoise_graphs(segments, hidden)
        return self._forward(hidden, PackedLayout.build(segments, self.device))

    def _forward(self, hidden: Tensor, layout: PackedLayout) -> Tensor | list[Tensor | None]:
        hidden = self.stage(hidden, layout, self.cache)
        return self.stage.heads(hidden, layout) if self.stage.stage.is_last else hidden

    def synchronize(self) -> None:
        """Wait until this stage's queued GPU work is done (where its results leave the device,
        or the orchestrator must know a step is complete)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def fork(self, src: str, dst: str) -> None:
        self.cache.fork(src, dst)

    def export_context(self, context_id: str) -> Tensor | None:
        """This stage's K/V of a context as one tensor, [layers, 2, tokens, kv_heads, head_dim]
        (None: the context holds nothing here), for `import_context` in another process."""
        entries = [self.cache.get(context_id, layer) for layer in self.stage.stage.layers]
        if entries[0] is None:
            return None
        return torch.stack([torch.stack(kv) for kv in entries])

    def import_context(self, context_id: str, packed: Tensor) -> None:
        """A new context holding what `export_context` packed."""
        if context_id in self.cache.context_ids():
            raise ValueError(f"context {context_id!r} already exists")
        for i, layer in enumerate(self.stage.stage.layers):
            self.cache.append(context_id, layer, packed[i, 0], packed[i, 1])

    def free(self, context_ids: list[str]) -> None:
        """Drop these contexts' caches and the denoising graphs that read them."""
        self.cache.free(context_ids)
        if self.denoise_graphs is not None:
            self.denoise_graphs.forget(context_ids)
