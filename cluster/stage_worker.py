"""`StageWorker`: one pipeline stage in its own process (a Ray actor).

It owns a `StageRunner`: a `BagelStage` (its range of LLM layers, loaded straight from the
checkpoint) and the KV caches of those layers for every live context. `run` takes one
micro-batch: the first stage embeds the segments, the others receive hidden states from the
previous stage; the last stage returns per-segment outputs (logits / velocities) on the CPU, the
others send hidden states on.
Actor calls execute in submission order, which keeps every stage on the same micro-batch order.
"""
from __future__ import annotations

import os
import socket
import time

import torch
from torch import Tensor

from bagel_model import layers
from bagel_model.config import BagelConfig
from bagel_model.demo import random_module
from bagel_model.fp8 import quantize_gen_mlp
from bagel_model.loader import load_stage
from bagel_model.model import BagelStage
from bagel_model.runner import StageRunner
from bagel_model.segments import Segment
from bagel_model.stage import StageSpec
from bagel_model.tokenizer import BagelTokenizer

from .devices import resolve_device
from .transport import Handle, Transport


class StageWorker:
    def __init__(self, checkpoint_dir: str, spec: StageSpec, device: str, dtype: torch.dtype,
                 memory_fraction: float | None = None, random_weights: bool = False, compile: bool | None = None,
                 fp8: bool = False):
        self.spec = spec
        self.device = resolve_device(device)
        if self.device.type == "cuda" and memory_fraction:
            torch.cuda.set_per_process_memory_fraction(memory_fraction, self.device)
        if compile or (compile is None and self.device.type == "cuda"):
            layers.compile_elementwise()
        config = BagelConfig.from_checkpoint_dir(checkpoint_dir)
        tokenizer = BagelTokenizer.from_dir(checkpoint_dir)
        if random_weights:
            model = random_module(lambda: BagelStage(config, spec), self.device, dtype, seed=spec.index)
        else:
            model = load_stage(checkpoint_dir, config, spec, device=self.device, dtype=dtype)
        if fp8:
            quantize_gen_mlp(model)
        self.runner = StageRunner(model, (tokenizer.vision_start_id, tokenizer.vision_end_id))
        self.transport: Transport | None = None
        self.busy_s = 0.0  # time spent computing micro-batches (not waiting for the previous stage)

    def rendezvous_address(self) -> str:
        """A `tcp://host:port` this process can listen on (asked of stage 0)."""
        host = socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{host}:{port}"

    def init_transport(self, kind: str, init_method: str | None) -> int:
        self.transport = Transport(kind, self.spec.index, self.spec.num_stages, init_method, self.device)
        return os.getpid()

    @torch.inference_mode()
    def run(self, microbatch: int, segments: list[Segment], upstream: Handle | None,
            released: list[int]) -> Handle | list[Tensor | None]:
        self.transport.release(released)
        hidden = None if self.spec.is_first else self.transport.recv(upstream)
        start = time.perf_counter()
        try:
            out = self.runner.run(segments, hidden)
            if not self.spec.is_last:
                return self.transport.send(out, microbatch)
            return [None if o is None else o.cpu() for o in out]
        finally:
            self.busy_s += time.perf_counter() - start

    def fork(self, src: str, dst: str) -> None:
        self.runner.cache.fork(src, dst)

    def free(self, context_ids: list[str]) -> None:
        self.runner.cache.free(context_ids)

    def stats(self) -> dict:
        memory = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
        contexts = self.runner.cache.context_ids()
        return {"stage": self.spec.index, "layers": [self.spec.layers.start, self.spec.layers.stop],
                "live_contexts": len(contexts), "context_ids": contexts,
                "kv_bytes": self.runner.cache.nbytes(), "gpu_memory_bytes": memory, "pid": os.getpid(),
                "busy_s": self.busy_s}
