"""`StageGroup`: the stage workers of one replica — `branch_groups` copies of the pipeline
(each holding every stage's weights) of `num_stages` `StageWorker` actors — created together,
and the submission of work to them.

The workers go into the replica's placement group, which Serve reserved with the replica
(`placement_group_bundles`, cluster/topology.py): worker `rank` in bundle 1 + rank, so a replica
starts only when all its workers fit and they leave with it. Outside Serve (no placement group)
they are plain actors.

A micro-batch is submitted to the stages of one branch group as a chain of actor calls, each
taking the previous stage's result (a small transport handle) as argument, so Ray starts stage
k+1 only when stage k has sent its hidden states. Everything is submitted under one lock
(`ordered()`), so every worker sees its calls in one global order: point-to-point transfers
between two workers then always match (each transfer's send and receive belong to one
submission), and no call waits for one submitted after it. Several chains in flight keep the
stages busy at once (CFG branches of one step, steps of other requests).
"""
from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import ray
import torch
from ray.util import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from bagel_model.segments import Segment
from bagel_model.simulated import Simulation
from bagel_model.stage import split_layers
from pipelines.step import StepPart

from .stage_worker import StageWorker
from .topology import Topology
from .transport import Transport


def _latents_in(segments: list[Segment], dtype: torch.dtype) -> list[Segment]:
    """The segments with their latents in the stages' dtype. The first stage casts them on
    arrival anyway, so casting before sending is exact and shrinks float32 payloads; segments
    sharing a latent tensor (the CFG branches of a step) keep sharing one."""
    cast = {id(s.latents): s.latents.to(dtype) for s in segments if s.latents is not None}
    return [s if s.latents is None else replace(s, latents=cast[id(s.latents)]) for s in segments]


@dataclass(frozen=True)
class Call:
    """A submitted call: its result, and the transfers (tag, sending worker) it or the chain it
    ends made, released once the caller has waited for it."""

    ref: ray.ObjectRef
    sent: tuple[tuple[int, int], ...] = ()


class StageGroup:
    def __init__(self, checkpoint_dir: str, num_layers: int, num_stages: int, *, branch_groups: int = 1,
                 replica: int | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 gpus_per_stage: float = 0.0, memory_fraction: float | None = None, transport: str = "auto",
                 layer_sizes: list[int] | None = None, random_weights: bool = False,
                 compile: bool | None = None, fp8: bool = False, quantize: str | None = None,
                 simulation: Simulation | None = None):
        self.specs = split_layers(num_layers, num_stages, layer_sizes)
        self.topology = Topology(1, branch_groups, num_stages)
        self.dtype = dtype
        pg = get_current_placement_group()
        if pg is not None and pg.bundle_count < 1 + self.topology.workers_per_replica:
            raise RuntimeError(f"the replica's placement group has {pg.bundle_count} bundles; {branch_groups} branch "
                               f"group(s) of {num_stages} stage(s) need {1 + self.topology.workers_per_replica}")
        worker_cls = ray.remote(StageWorker)
        self.workers = []
        for group in range(branch_groups):
            for spec in self.specs:
                opts: dict = {"num_cpus": 0, "num_gpus": gpus_per_stage, "max_restarts": 0}
                if pg is not None:
                    opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                        pg, placement_group_bundle_index=1 + self.rank(group, spec.index))
                self.workers.append(worker_cls.options(**opts).remote(
                    checkpoint_dir, spec, device, dtype, memory_fraction, random_weights, compile, fp8, quantize,
                    simulation, branch_group=group, replica=replica))
        gpus = ray.get([w.gpu.remote() for w in self.workers])
        self.transport = transport if transport != "auto" or any(gpus) else "gloo"
        # How tensors travel between workers (for /health): per pair where the kind is auto.
        self.links = sorted({"cuda_ipc" if a == b else "nccl" for a, b in itertools.combinations(gpus, 2)}) \
            if self.transport == "auto" else [self.transport]
        init_method = None
        if Transport.needs_process_group(self.transport, gpus):
            init_method = ray.get(self.workers[0].rendezvous_address.remote())
        world = len(self.workers)
        self.pids = ray.get([w.init_transport.remote(self.transport, rank, world, init_method, gpus)
                             for rank, w in enumerate(self.workers)])
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._released: list[list[int]] = [[] for _ in self.workers]  # per worker, tags to drop on its next call

    @property
    def num_stages(self) -> int:
        return self.topology.stages

    @property
    def num_groups(self) -> int:
        return self.topology.branch_groups

    def rank(self, group: int, stage: int) -> int:
        return self.topology.rank(group, stage)

    @contextmanager
    def ordered(self) -> Iterator[StageGroup]:
        """Hold the submission order: calls made inside reach every worker in this order."""
        with self._lock:
            yield self

    def _call(self, rank: int, method: str, *args) -> ray.ObjectRef:
        released, self._released[rank] = self._released[rank], []
        return getattr(self.workers[rank], method).remote(released, *args)

    # -- submissions (inside `ordered()`) ----------------------------------------------------

    def chain(self, group: int, segments: list[Segment], parts: list[StepPart] | None = None,
              latents: list[Call | None] | None = None, owners: list[int | None] | None = None) -> Call:
        """One micro-batch through the stages of a branch group; the call of its last stage.
        A denoising step's micro-batch carries `parts` (one per image, in segment order) to its
        first and last stage, `latents` (per part: a `share` of the image's latents, or None) to
        the first, and `owners` (per part: the rank of the image's state owner where that is
        another worker, which the last stage then sends the velocities) to the last."""
        metadata = [s.metadata() for s in segments]
        segments = _latents_in(segments, self.dtype)
        with self._lock:
            microbatch = next(self._ids)
            tags = {o: next(self._ids) for o in owners or () if o is not None}
            ref, sent = None, []
            for spec in self.specs:
                rank = self.rank(group, spec.index)
                args = [microbatch, segments if spec.is_first else metadata, ref]
                if parts:
                    args += [parts if spec.is_first or spec.is_last else None,
                             owners if spec.is_last else None, tags if spec.is_last else None]
                    if spec.is_first:
                        args += [c.ref if c else None for c in latents or [None] * len(parts)]
                ref = self._call(rank, "run", *args)
                if not spec.is_last:
                    sent.append((microbatch, rank))
            sent += [(tag, rank) for tag in tags.values()]
        return Call(ref, tuple(sent))

    def share(self, owner: int, key: str, dsts: list[int]) -> Call:
        """The state owner sends image `key`'s latents to the workers `dsts` (which keep them
        until the share is released: each micro-batch of the step reads them)."""
        with self._lock:
            tag = next(self._ids)
            return Call(self._call(owner, "share", tag, key, dsts), tuple((tag, rank) for rank in [owner, *dsts]))

    def gather(self, owner: int, parts: list[list[StepPart]], chains: list[Call]) -> Call:
        """The state owner collects the velocities other branch groups' chains sent it
        (`parts[i]`: its images' parts in `chains[i]`, in their order there)."""
        with self._lock:
            return Call(self._call(owner, "gather", parts, *[c.ref for c in chains]))

    def move_context(self, src_group: int, dst_group: int, src: str, dst: str) -> list[Call]:
        """Context `dst` on `dst_group` becomes a copy of `src` on `src_group`, stage by stage."""
        calls = []
        with self._lock:
            for spec in self.specs:
                sender, receiver = self.rank(src_group, spec.index), self.rank(dst_group, spec.index)
                tag = next(self._ids)
                handle = self._call(sender, "send_context", tag, src, receiver)
                calls.append(Call(self._call(receiver, "recv_context", dst, handle), ((tag, sender),)))
        return calls

    # -- results -----------------------------------------------------------------------------

    def wait(self, calls: list[Call]) -> list:
        """The results of submitted calls; their transfers count as consumed afterwards, however
        the wait ends (the senders may then drop what they kept for them)."""
        try:
            return ray.get([c.ref for c in calls])
        finally:
            with self._lock:
                for call in calls:
                    for tag, rank in call.sent:
                        self._released[rank].append(tag)

    def call_last(self, method: str, *args, group: int = 0) -> ray.ObjectRef:
        """Queue a call on a branch group's last stage behind every call submitted so far."""
        with self._lock:
            return getattr(self.workers[self.rank(group, self.num_stages - 1)], method).remote(*args)

    def broadcast(self, method: str, *args, group: int | None = None) -> list:
        """Call a method on every worker (of one branch group, if given), in order, and wait."""
        ranks = range(len(self.workers)) if group is None else [self.rank(group, k) for k in range(self.num_stages)]
        with self._lock:
            refs = [getattr(self.workers[r], method).remote(*args) for r in ranks]
        return ray.get(refs)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
