"""`StageGroup`: the N `StageWorker` actors of one pipeline, created together, and the
submission of micro-batches through them.

A micro-batch is submitted to every stage at once as a chain of actor calls, each taking the
previous stage's result (a small transport handle) as argument, so Ray starts stage k+1 only
when stage k has sent its hidden states. Submissions from all threads are serialised under one
lock, so every stage sees micro-batches in the same order. Several chains in flight keep the
stages busy at once (CFG branches of one step, steps of other requests).
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import replace

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor

from bagel_model.segments import Segment
from bagel_model.simulated import Simulation
from bagel_model.stage import split_layers
from pipelines.step import StepPart

from .stage_worker import StageWorker


def _latents_in(segments: list[Segment], dtype: torch.dtype) -> list[Segment]:
    """The segments with their latents in the stages' dtype. The first stage casts them on
    arrival anyway, so casting before sending is exact and shrinks float32 payloads; segments
    sharing a latent tensor (the CFG branches of a step) keep sharing one."""
    cast = {id(s.latents): s.latents.to(dtype) for s in segments if s.latents is not None}
    return [s if s.latents is None else replace(s, latents=cast[id(s.latents)]) for s in segments]

class StageGroup:
    def __init__(self, checkpoint_dir: str, num_layers: int, num_stages: int, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, gpus_per_stage: float = 0.0,
                 memory_fraction: float | None = None, transport: str = "auto",
                 layer_sizes: list[int] | None = None, random_weights: bool = False,
                 placement_timeout_s: float = 120.0, compile: bool | None = None, fp8: bool = False,
                 quantize: str | None = None, simulation: Simulation | None = None):
        self.specs = split_layers(num_layers, num_stages, layer_sizes)
        self.dtype = dtype
        self._pg = None
        options: dict = {"num_cpus": 0, "max_restarts": 0}
        if gpus_per_stage > 0:
            self._pg = placement_group([{"GPU": gpus_per_stage}] * num_stages, strategy="PACK")
            try:
                ray.get(self._pg.ready(), timeout=placement_timeout_s)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(self._pg)
                raise RuntimeError(
                    f"cannot place {num_stages} stages of {gpus_per_stage} GPU each within "
                    f"{placement_timeout_s} s: the cluster has {ray.available_resources().get('GPU', 0)} GPUs free"
                ) from None
        worker_cls = ray.remote(StageWorker)
        self.workers = []
        for spec in self.specs:
            opts = dict(options, num_gpus=gpus_per_stage)
            if self._pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self._pg, spec.index)
            self.workers.append(worker_cls.options(**opts).remote(
                checkpoint_dir, spec, device, dtype, memory_fraction, random_weights, compile, fp8, quantize,
                simulation))
        self.transport = self._choose_transport(transport, device)
        init_method = None
        if self.transport in ("gloo", "nccl") and num_stages > 1:
            init_method = ray.get(self.workers[0].rendezvous_address.remote())
        ray.get([w.init_transport.remote(self.transport, init_method) for w in self.workers])
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._finished: list[int] = []

    def _choose_transport(self, transport: str, device: str) -> str:
        if transport != "auto":
            return transport
        if device == "cpu":
            return "gloo"
        gpus = ray.get([w.__ray_call__.remote(lambda self: str(torch.cuda.get_device_properties(
            self.device).uuid)) for w in self.workers])
        return "cuda_ipc" if len(set(gpus)) < len(gpus) else "nccl"

    def submit(self, segments: list[Segment], part: StepPart | None = None,
               latents: ray.ObjectRef | None = None) -> tuple[int, ray.ObjectRef]:
        """Start one micro-batch through every stage; returns its id and the last stage's result.
        `part` goes to the first and last stage of a denoising step's micro-batches; `latents`
        (the last stage's result of the image's previous step) to the first stage."""
        metadata = [s.metadata() for s in segments]
        segments = _latents_in(segments, self.dtype)
        with self._lock:
            microbatch = next(self._ids)
            finished, self._finished = self._finished, []
            ref = None
            for worker, spec in zip(self.workers, self.specs):
                ends = spec.is_first or spec.is_last
                ref = worker.run.remote(microbatch, segments if spec.is_first else metadata, ref, finished,
                                        part if ends else None, latents if spec.is_first else None)
        return microbatch, ref

    def wait(self, submitted: list[tuple[int, ray.ObjectRef]]) -> list:
        """The results of submitted micro-batches; they count as consumed afterwards, however the
        wait ends (a stage may then drop what it kept for them)."""
        try:
            return ray.get([ref for _, ref in submitted])
        finally:
            with self._lock:
                self._finished += [m for m, _ in submitted]

    def run(self, batches: list[list[Segment]]) -> list[list[Tensor | None]]:
        """Run micro-batches concurrently through the pipeline; per batch, per segment outputs."""
        return self.wait([self.submit(b) for b in batches])

    def call_last(self, method: str, *args) -> ray.ObjectRef:
        """Queue a call on the last stage behind every micro-batch submitted so far."""
        with self._lock:
            return getattr(self.workers[-1], method).remote(*args)

    def broadcast(self, method: str, *args) -> list:
        """Call a method on every stage (in micro-batch order) and wait."""
        with self._lock:
            refs = [getattr(w, method).remote(*args) for w in self.workers]
        return ray.get(refs)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        if self._pg is not None:
            remove_placement_group(self._pg)
