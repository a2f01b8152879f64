"""The deployment topology: replicas x branch groups x stages, its GPU shares, the placement
group each replica asks Serve for, and whether it fits the cluster.

- `replicas`: complete, independent pipelines, each a Serve replica of the ingress that owns
  its stage workers (Serve routes each request to the least-loaded replica).
- `branch_groups` (`cfg_parallel`): per replica, 1-3 copies of the pipeline; the CFG branches
  of a denoising step run on different groups at the same time.
- `stages`: MoT pipeline stages per branch group.

Each replica is gang-scheduled by Serve through `placement_group_bundles`: bundle 0 holds the
ingress replica, bundle 1 + g * stages + k the worker of stage k in branch group g. Encoder and
decoder are their own deployments, one of each per replica.

`check_fits` estimates where Ray will put the bundles (first fit, GPU by GPU, in node order)
and the weights each GPU then holds; a topology that cannot be placed is an error that names
topologies that can.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from bagel_model.errors import InvalidRequest

BUNDLE_CPU = 0.01  # a bundle cannot be empty: CPU-only bundles reserve this much (the processes ask for 0)
MEMORY_HEADROOM = 0.9  # weights may fill this share of a GPU (the rest: activations, KV caches, CUDA context)
MAX_GROUPS = 3  # COND, text-free and image-free: the most branches a step runs
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class TopologyError(InvalidRequest):
    """The topology cannot be placed on this cluster (or is malformed)."""


@dataclass(frozen=True)
class Topology:
    replicas: int
    branch_groups: int
    stages: int

    def __post_init__(self):
        if self.replicas < 1 or self.stages < 1 or not 1 <= self.branch_groups <= MAX_GROUPS:
            raise TopologyError(f"topology {self}: replicas and stages must be >= 1, branch groups 1 to {MAX_GROUPS}")

    def __str__(self) -> str:
        return f"{self.replicas}x{self.branch_groups}x{self.stages}"

    @property
    def workers_per_replica(self) -> int:
        return self.branch_groups * self.stages

    @property
    def workers(self) -> int:
        return self.replicas * self.workers_per_replica

    def rank(self, group: int, stage: int) -> int:
        """A worker's index within its replica (its transport rank and bundle index - 1)."""
        return group * self.stages + stage


@dataclass(frozen=True)
class Shares:
    """GPU share of each stage worker, encoder and decoder (0: CPU)."""

    stage: float
    encoder: float
    decoder: float


def gpu_shares(topology: Topology, gpus: float) -> Shares:
    """Shares that fit `topology` (at its most replicas) on `gpus` GPUs: a GPU per stage worker
    when there are enough, the encoders and decoders sharing the spare ones (or squeezing into
    what the workers leave); else the workers split 80% of each GPU they share and the
    encoders and decoders the other 20%."""
    gpus = int(gpus)
    if gpus < 1:
        return Shares(0.0, 0.0, 0.0)
    workers, others = topology.workers, 2 * topology.replicas
    if gpus > workers:
        share = min(0.5, math.floor(100 / math.ceil(others / (gpus - workers))) / 100)
        return Shares(1.0, share, share)
    if gpus == workers:
        share = math.floor(10 / math.ceil(others / gpus)) / 100
        return Shares(0.9, share, share)
    stage = math.floor(80 / math.ceil(workers / gpus)) / 100
    share = math.floor(20 / math.ceil(others / gpus)) / 100
    return Shares(stage, share, share)


def replica_bundles(topology: Topology, stage_gpus: float) -> list[dict[str, float]]:
    """Serve's `placement_group_bundles` of one replica: the ingress, then every stage worker."""
    worker = {"GPU": stage_gpus} if stage_gpus > 0 else {"CPU": BUNDLE_CPU}
    return [{"CPU": BUNDLE_CPU}] + [dict(worker) for _ in range(topology.workers_per_replica)]


@dataclass(frozen=True)
class Cluster:
    """GPUs per node (alive nodes) and, where known, the memory of one GPU."""

    node_gpus: tuple[int, ...]
    gpu_memory_bytes: int | None = None

    @property
    def gpus(self) -> int:
        return sum(self.node_gpus)

    def describe(self) -> str:
        memory = f" of {self.gpu_memory_bytes / 2**30:.0f} GiB" if self.gpu_memory_bytes else ""
        nodes = len(self.node_gpus)
        return f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}{memory} on {nodes} node{'s' if nodes != 1 else ''}"


def check_fits(topology: Topology, shares: Shares, cluster: Cluster, weights: tuple[int, ...] | None,
               weights_of: Callable[[int], tuple[int, ...]] | None = None, strategy: str = "PACK",
               memory_fraction: float | None = None) -> None:
    """Raise `TopologyError` unless every replica's workers, encoders and decoders fit the
    cluster's GPUs and, where the GPU memory is known, the stage weights (`weights`: bytes per
    stage) fit its memory. Without GPU shares (CPU) everything fits. `weights_of(stages)`: the
    weights of an even split, for naming the topologies that would fit."""
    problem = _placement_problem(topology, shares, cluster, weights, strategy, memory_fraction)
    if problem is None:
        return
    fits = fitting(cluster, weights_of or (lambda stages: None), strategy, memory_fraction)
    hint = (f" Topologies (replicas x cfg_parallel x stages) that fit with automatic GPU shares: "
            f"{', '.join(map(str, fits))}." if fits else "")
    raise TopologyError(f"topology {topology} (replicas x cfg_parallel x stages) does not fit "
                        f"{cluster.describe()}: {problem}.{hint}")


def fitting(cluster: Cluster, weights_of: Callable[[int], tuple[int, ...] | None], strategy: str = "PACK",
            memory_fraction: float | None = None, max_stages: int = 4, limit: int = 6) -> list[Topology]:
    """Topologies with automatic GPU shares that fit the cluster, those with the most workers
    (at most one per GPU) and then the fewest stages first."""
    found = []
    for stages in range(1, max_stages + 1):
        weights = weights_of(stages)
        for groups in range(1, MAX_GROUPS + 1):
            for replicas in range(1, cluster.gpus // (groups * stages) + 1):
                t = Topology(replicas, groups, stages)
                if _placement_problem(t, gpu_shares(t, cluster.gpus), cluster, weights, strategy,
                                      memory_fraction) is None:
                    found.append(t)
    found.sort(key=lambda t: (-t.workers, t.stages, -t.branch_groups))
    return found[:limit]


@dataclass
class _GPU:
    node: int
    free: float = 1.0
    weights: int = 0  # stage weight bytes placed here


def _placement_problem(topology: Topology, shares: Shares, cluster: Cluster, weights: tuple[int, ...] | None,
                       strategy: str, memory_fraction: float | None) -> str | None:
    """Why the topology cannot be placed, or None."""
    if shares.stage <= 0:
        return None
    if shares.stage > 1:
        return f"a stage worker runs on one GPU, but gpus_per_stage is {shares.stage}"
    if cluster.gpus == 0:
        return "it has no GPUs, but the stage workers ask for GPU shares"
    memory = cluster.gpu_memory_bytes
    if weights is not None and memory:
        cap = memory * (memory_fraction or MEMORY_HEADROOM)
        if max(weights) > cap:
            return (f"one stage's weights take {max(weights) / 2**30:.1f} GiB, more than the {cap / 2**30:.1f} "
                    f"GiB a stage process may use; use more stages (or a quantized format)")
    if strategy == "STRICT_SPREAD" and topology.workers_per_replica + 1 > len(cluster.node_gpus):
        return f"STRICT_SPREAD puts each of a replica's {topology.workers_per_replica + 1} bundles on its own node"
    gpus = [_GPU(node) for node, n in enumerate(cluster.node_gpus) for _ in range(n)]
    per_replica = [(weights or (0,) * topology.stages)[k] for _ in range(topology.branch_groups)
                   for k in range(topology.stages)]
    for _ in range(topology.replicas):
        pools = [[g for g in gpus if g.node == n] for n in range(len(cluster.node_gpus))] \
            if strategy == "STRICT_PACK" else [gpus]
        if not any(_first_fit(pool, shares.stage, per_replica) for pool in pools):
            if strategy == "STRICT_PACK":
                return (f"STRICT_PACK puts a replica's {topology.workers_per_replica} stage workers of "
                        f"{shares.stage} GPU on one node")
            need = topology.workers * shares.stage
            return f"its {topology.workers} stage workers of {shares.stage} GPU need {need:g} GPUs"
    for share in (shares.encoder, shares.decoder):
        if share > 0 and not _first_fit(gpus, share, [0] * topology.replicas):
            return f"no GPU room is left for {topology.replicas} encoder(s) and decoder(s) of {share} GPU each"
    fullest = max(g.weights for g in gpus)
    if memory and fullest > memory * MEMORY_HEADROOM:
        return (f"one GPU would hold {fullest / 2**30:.1f} GiB of stage weights, more than "
                f"{MEMORY_HEADROOM:.0%} of its memory")
    return None


def _first_fit(gpus: list[_GPU], share: float, weights: list[int]) -> bool:
    """Place one item of `share` GPU per entry of `weights`, each on the first GPU with room;
    `gpus` changes only when all of them fit."""
    free = [g.free for g in gpus]
    chosen = []
    for _ in weights:
        i = next((i for i, f in enumerate(free) if f >= share - 1e-9), None)
        if i is None:
            return False
        free[i] -= share
        chosen.append(i)
    for i, weight in zip(chosen, weights):
        gpus[i].free -= share
        gpus[i].weights += weight
    return True
