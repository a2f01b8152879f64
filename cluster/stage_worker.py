"""`StageWorker`: one pipeline stage of one branch group in its own process (a Ray actor).

It owns a `StageRunner`: a `BagelStage` (its range of LLM layers, loaded straight from the
checkpoint) and the KV caches of those layers for the contexts its branch group holds. `run`
takes one micro-batch: the first stage embeds the segments, the others receive hidden states
from the previous stage; the last stage returns per-segment outputs (logits) on the CPU, the
others send hidden states on.

Denoising steps keep the sampler's state on the last stage of the branch group that runs the
image's COND branch (the state owner), in a `SamplerStates` (pipelines/step.py). A step
micro-batch carries the branches of one or more images (step-level batching,
pipelines/batching.py), with a `StepPart` per image. The last stage collects the velocities of
the images it owns in `run` and sends the others' to their owners, whose `gather` collects
them. When a step's last branch is in, the owner applies the `EulerStep` to the image's latents
(float32, on its device). It returns them only after the final step; before a step whose first
stages live in other processes, `share` sends them there (stage dtype), so latents stay on the
devices.
A context can move to another branch group (`send_context` / `recv_context`: a fork whose copy
runs elsewhere), its K/V going device to device like everything else (transport.py).
Actor calls execute in submission order, which keeps every worker on the same order.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from bagel_model.config import BagelConfig
from bagel_model.demo import random_quantized
from bagel_model.kernels import KernelChoice, select_kernels
from bagel_model.loader import load_stage
from bagel_model.model import BagelStage
from bagel_model.quantize import quantize_gen_mlp
from bagel_model.runner import StageRunner
from bagel_model.segments import Segment, SegmentKind
from bagel_model.simulated import Simulation, SimulatedRunner
from bagel_model.stage import StageSpec
from bagel_model.tokenizer import BagelTokenizer
from pipelines.prefix_cache import is_cached_prefix
from pipelines.step import SamplerStates, StepPart, by_part

from .devices import resolve_device
from .transport import Handle, Transport


@dataclass(frozen=True)
class StepReply:
    """What a denoising micro-batch's last stage (or an owner's `gather`) returns: the
    velocities it sent to other state owners (by owner rank), and the latents (float32, CPU) of
    the images whose final step it applied."""

    sent: dict[int, Handle]
    done: dict[str, Tensor]


class StageWorker:
    def __init__(self, checkpoint_dir: str, spec: StageSpec, device: str, dtype: torch.dtype,
                 memory_fraction: float | None = None, random_weights: bool = False, compile: bool | None = None,
                 fp8: bool = False, quantize: str | None = None, simulation: Simulation | None = None, *,
                 branch_group: int = 0, replica: int | None = None):
        """`simulation`: no model; the runner sleeps for what the hardware profile says (bench/simulate.py).
        `branch_group`, `replica`: where this worker sits in the topology (for /health)."""
        self.spec, self.dtype, self.branch_group, self.replica = spec, dtype, branch_group, replica
        self.device = resolve_device(device)
        if simulation is not None:
            self.runner = SimulatedRunner(BagelConfig.from_checkpoint_dir(checkpoint_dir), spec, simulation, dtype)
        else:
            self.runner = self._load(checkpoint_dir, memory_fraction, random_weights, compile, fp8, quantize)
        self.transport: Transport | None = None
        self.samplers = SamplerStates(self.device)  # state owner: the images being denoised
        self._shared: dict[int, Tensor] = {}  # first stage: latents received, by share tag (read by each branch)
        self.busy_s = 0.0  # time spent computing micro-batches (not waiting for the previous stage);
        # a simulated runner reports its simulated GPU's time instead (its calls return before it is done)

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
            quantize_gen_mlp(model)
        return StageRunner(model, tokenizer.image_markers)

    def rendezvous_address(self) -> str:
        """A `tcp://host:port` this process can listen on (asked of stage 0)."""
        host = socket.gethostbyname(socket.gethostname())
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{host}:{port}"

    def gpu(self) -> str | None:
        """This worker's GPU (its uuid), None on the CPU: which peers CUDA IPC can reach."""
        if self.device.type != "cuda":
            return None
        return str(torch.cuda.get_device_properties(self.device).uuid)

    def init_transport(self, kind: str, rank: int, world_size: int, init_method: str | None,
                       gpus: list[str | None]) -> int:
        self.transport = Transport(kind, rank, world_size, init_method, self.device, gpus)
        return os.getpid()

    @torch.inference_mode()
    def run(self, released: list[int], microbatch: int, segments: list[Segment], upstream: Handle | None,
            parts: list[StepPart] | None = None, owners: list[int | None] | None = None,
            tags: dict[int, int] | None = None, *latents: Handle | None) -> Handle | list | StepReply | None:
        """`parts`: this micro-batch computes these images' branches of a denoising step, in
        segment order; `owners` (last stage): per part, its state owner's rank where that is
        another process (the velocities go there, under `tags[owner]`), else None; `latents`
        (first stage): per part, its image's latents for noise segments without any, shared by
        the state owner when that is another process, else None."""
        self._release(released)
        hidden = None if self.spec.is_first else self.transport.recv(upstream)
        start = time.perf_counter()
        try:
            if self.spec.is_first and parts:
                segments = self._with_latents(segments, parts, latents)
            out = self.runner.run(segments, hidden)
            if not self.spec.is_last:
                return self.transport.send(out, microbatch, [self.transport.rank + 1])
            if parts:
                return self._reply(parts, out, owners, tags)
            self.runner.synchronize()
            return [None if o is None else o.cpu() for o in out]
        finally:
            self.busy_s += time.perf_counter() - start

    def _with_latents(self, segments: list[Segment], parts: list[StepPart],
                      latents: tuple[Handle | None, ...]) -> list[Segment]:
        out = []
        for (part, group), handle in zip(by_part(parts, segments), latents):
            if handle is None:  # the state lives here (or the segments carry the first step's latents)
                out += self.samplers.fill([part], list(group))
                continue
            x = self._shared.get(handle.tag)
            if x is None:
                x = self._shared[handle.tag] = self.transport.recv(handle)
            out += [replace(s, latents=x) if s.kind is SegmentKind.NOISE and s.latents is None else s for s in group]
        return out

    def _reply(self, parts: list[StepPart], out: list[Tensor], owners: list[int | None],
               tags: dict[int, int]) -> StepReply:
        """Send the velocities of images owned elsewhere to their owners (one tensor per owner,
        the parts' rows one after another), collect the rest here."""
        mine: list[tuple[StepPart, list[Tensor]]] = []
        theirs: dict[int, list[Tensor]] = {}
        for (part, vs), owner in zip(by_part(parts, out), owners):
            if owner is None:
                mine.append((part, list(vs)))
            else:
                theirs.setdefault(owner, []).extend(vs)
        if theirs:
            self.runner.synchronize()
        sent = {owner: self.transport.send(torch.cat(vs), tags[owner], [owner]) for owner, vs in theirs.items()}
        return StepReply(sent, self._step([p for p, _ in mine], [v for _, vs in mine for v in vs]))

    @torch.inference_mode()
    def gather(self, released: list[int], parts: list[list[StepPart]], *replies: StepReply) -> StepReply:
        """State owner: collect the velocities other branch groups' micro-batches sent it,
        `parts[i]` those of `replies[i]` (each branch's rows: its image's latent tokens)."""
        self._release(released)
        rank, collected, velocities = self.transport.rank, [], []
        for chain_parts, reply in zip(parts, replies):
            rows = [len(self.samplers.latents(p.key)) for p in chain_parts for _ in p.branches]
            velocities += self.transport.recv(reply.sent[rank]).split(rows)
            collected += chain_parts
        return StepReply({}, self._step(collected, velocities))

    def _step(self, parts: list[StepPart], velocities: list[Tensor]) -> dict[str, Tensor]:
        """Collect the parts' velocities; the latents (float32, CPU) of images whose final step
        this applied."""
        if not parts:
            return {}
        done = self.samplers.collect(parts, velocities)
        final = {key: out.x for key, out in done.items() if out.x is not None and _final(parts, key)}
        if final or self.transport.world_size > 1:  # the next step reads the latents elsewhere: done when this returns
            self.runner.synchronize()
        return {key: x.cpu() for key, x in final.items()}

    def share(self, released: list[int], tag: int, key: str, dsts: list[int]) -> Handle:
        """State owner: send the image's latents (stage dtype) to the first stages of `dsts`."""
        self._release(released)
        self.runner.synchronize()
        return self.transport.send(self.samplers.latents(key).to(self.dtype), tag, dsts)

    def send_context(self, released: list[int], tag: int, context_id: str, dst: int) -> Handle | None:
        """This stage's K/V of a context (`StageRunner.export_context`) to `dst` (None: the
        context holds nothing here)."""
        self._release(released)
        self.runner.synchronize()
        packed = self.runner.export_context(context_id)
        return None if packed is None else self.transport.send(packed, tag, [dst])

    def recv_context(self, released: list[int], context_id: str, handle: Handle | None) -> None:
        """Context `context_id` becomes what another branch group's `send_context` sent."""
        self._release(released)
        if context_id in self.runner.cache.context_ids():
            raise ValueError(f"context {context_id!r} already exists")
        if handle is not None:
            self.runner.import_context(context_id, self.transport.recv(handle))

    def _release(self, tags: list[int]) -> None:
        """The orchestrator has seen these transfers consumed."""
        self.transport.release(tags)
        for tag in tags:
            self._shared.pop(tag, None)

    def predicted_clean(self, key: str) -> Tensor:
        """State owner: the clean latents the image's last applied step predicts (for a preview;
        queued right behind that step, so it never holds up the next one for long)."""
        self.runner.synchronize()
        return self.samplers.predicted_clean(key).float().cpu()

    def fork(self, src: str, dst: str) -> None:
        self.runner.fork(src, dst)

    def free(self, context_ids: list[str]) -> None:
        self.runner.free(context_ids)
        self.samplers.free(context_ids)

    def stats(self) -> dict:
        """Requests' contexts and the prefix cache's (pipelines/prefix_cache.py) apart."""
        memory = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
        cache = self.runner.cache
        cached = [c for c in cache.context_ids() if is_cached_prefix(c)]
        contexts = [c for c in cache.context_ids() if not is_cached_prefix(c)]
        return {"replica": self.replica, "branch_group": self.branch_group, "stage": self.spec.index,
                "pid": os.getpid(), "layers": [self.spec.layers.start, self.spec.layers.stop],
                "live_contexts": len(contexts), "context_ids": contexts, "kv_bytes": cache.nbytes(contexts),
                "prefix_cache_contexts": len(cached), "prefix_cache_kv_bytes": cache.nbytes(cached),
                "latent_states": self.samplers.keys(), "gpu_memory_bytes": memory,
                "busy_s": getattr(self.runner, "busy_s", self.busy_s)}


def _final(parts: list[StepPart], key: str) -> bool:
    return any(p.key == key and p.step.final for p in parts)
