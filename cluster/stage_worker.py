"""`StageWorker`: one pipeline stage in its own process (a Ray actor).

It owns a `StageRunner`: a `BagelStage` (its range of LLM layers, loaded straight from the
checkpoint) and the KV caches of those layers for every live context. `run` takes one
micro-batch: the first stage embeds the segments, the others receive hidden states from the
previous stage; the last stage returns per-segment outputs (logits) on the CPU, the others send
hidden states on.

Denoising steps keep the sampler's state on the last stage, in a `SamplerStates`
(pipelines/step.py): a `StepPart` travels with every micro-batch of a step, and when the step's
last branch is through, the last stage applies the `EulerStep` to the image's latents (float32,
on its device). It returns them only when the first stage is another process (which embeds them
next step) or the step is the final one, so with one stage the latents never leave the GPU and
steps can be queued back to back.
Actor calls execute in submission order, which keeps every stage on the same micro-batch order.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import replace

import torch
from torch import Tensor

from bagel_model.config import BagelConfig
from bagel_model.demo import random_quantized
from bagel_model.fp8 import quantize_gen_mlp
from bagel_model.kernels import KernelChoice, select_kernels
from bagel_model.loader import load_stage
from bagel_model.model import BagelStage
from bagel_model.runner import StageRunner
from bagel_model.segments import Segment, SegmentKind
from bagel_model.simulated import Simulation, SimulatedRunner
from bagel_model.stage import StageSpec
from bagel_model.tokenizer import BagelTokenizer
from pipelines.step import SamplerStates, StepPart

from .devices import resolve_device
from .transport import Handle, Transport


class StageWorker:
    def __init__(self, checkpoint_dir: str, spec: StageSpec, device: str, dtype: torch.dtype,
                 memory_fraction: float | None = None, random_weights: bool = False, compile: bool | None = None,
                 fp8: bool = False, quantize: str | None = None, simulation: Simulation | None = None):
        """`simulation`: no model; the runner sleeps for what the hardware profile says (bench/simulate.py)."""
        self.spec, self.dtype = spec, dtype
        self.device = resolve_device(device)
        if simulation is not None:
            self.runner = SimulatedRunner(BagelConfig.from_checkpoint_dir(checkpoint_dir), spec, simulation, dtype)
        else:
            self.runner = self._load(checkpoint_dir, memory_fraction, random_weights, compile, fp8, quantize)
        self.transport: Transport | None = None
        self.samplers = SamplerStates(self.device)  # last stage: the images being denoised
        self.busy_s = 0.0  # time spent computing micro-batches (not waiting for the previous stage)

    def _load(self, checkpoint_dir: str, memory_fraction: float | None, random_weights: bool,
              compile: bool | None, fp8: bool, quantize: str | None) -> StageRunner:
        spec, dtype = self.spec, self.dtype
        if self.device.type == "cuda" and memory_fraction:
            torch.cuda.set_per_process_memory_fraction(memory_fraction, self.device)
        kernels = select_kernels(self.device, KernelChoice(compile=compile))
        config = BagelConfig.from_checkpoint_dir(checkpoint_dir)
        tokenizer = BagelTokenizer.from_dir(checkpoint_dir)
        if random_weights:
            model = random_quantized(lambda: BagelStage(config, spec, kernels), self.device, dtype, spec.index,
                                     quantize)
        else:
            model = load_stage(checkpoint_dir, config, spec, device=self.device, dtype=dtype, quantize=quantize,
                               kernels=kernels)
        if fp8:
            quantize_gen_mlp(model, kernels.choice.compile)
        return StageRunner(model, tokenizer.image_markers)

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
    def run(self, microbatch: int, segments: list[Segment], upstream: Handle | None, released: list[int],
            part: StepPart | None = None, latents: Tensor | None = None) -> Handle | list | Tensor | None:
        """`part`: this micro-batch computes these branches of a denoising step; `latents`: the
        image's latents for noise segments without any (sent by the last stage when it is
        another process)."""
        self.transport.release(released)
        hidden = None if self.spec.is_first else self.transport.recv(upstream)
        start = time.perf_counter()
        try:
            if self.spec.is_first and part is not None:
                segments = self._with_latents(segments, part, latents)
            out = self.runner.run(segments, hidden)
            if not self.spec.is_last:
                return self.transport.send(out, microbatch)
            if part is not None:
                return self._step(part, out)
            return [None if o is None else o.cpu() for o in out]
        finally:
            self.busy_s += time.perf_counter() - start

    def _with_latents(self, segments: list[Segment], part: StepPart, latents: Tensor | None) -> list[Segment]:
        if self.spec.is_last:  # one stage: the state lives here
            return self.samplers.fill([part], segments)
        return [replace(s, latents=latents) if s.kind is SegmentKind.NOISE and s.latents is None else s
                for s in segments]

    def _step(self, part: StepPart, velocities: list[Tensor]) -> Tensor | None:
        """Collect the part's velocities; after the step's last branch, the image's latents
        where they must go."""
        out = self.samplers.collect([part], velocities).get(part.key)
        if out is None:
            return None
        if part.step.final:
            return out.x.cpu()
        return None if self.spec.is_first else out.x.to(self.dtype).cpu()

    def predicted_clean(self, key: str) -> Tensor:
        """Last stage: the clean latents the image's last applied step predicts (for a preview;
        queued right behind that step, so it never holds up the next one for long)."""
        return self.samplers.predicted_clean(key).float().cpu()

    def fork(self, src: str, dst: str) -> None:
        self.runner.fork(src, dst)

    def free(self, context_ids: list[str]) -> None:
        self.runner.free(context_ids)
        self.samplers.free(context_ids)

    def stats(self) -> dict:
        memory = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
        contexts = self.runner.cache.context_ids()
        return {"stage": self.spec.index, "layers": [self.spec.layers.start, self.spec.layers.stop],
                "live_contexts": len(contexts), "context_ids": contexts,
                "kv_bytes": self.runner.cache.nbytes(), "latent_states": self.samplers.keys(), "gpu_memory_bytes": memory, "pid": os.getpid(),
                "busy_s": self.busy_s}
