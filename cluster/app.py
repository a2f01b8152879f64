"""`build_app`: the Serve application (the `import_path` of ray_config.yaml).

Binds the encoder, decoder and image-store deployments into the orchestrator (the ingress).
Each ingress replica creates its own stage workers, inside the placement group Serve reserves
for it from `placement_group_bundles`; replicas come from `num_replicas` or
`autoscaling_config`, and the encoder and decoder get as many (the image store is one, shared).
Auto fields are planned per pipeline (cluster/plan.py), then the topology is checked against the
cluster. With `simulate` set, every component runs without a model on the CPU, in the hardware
profile's simulated time (bagel_model/simulated.py).
"""
from __future__ import annotations

import logging
from functools import lru_cache

import ray
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from bagel_model.config import BagelConfig
from bagel_model.demo import checkpoint_or_demo
from bagel_model.memory_plan import stage_weight_bytes
from bagel_model.simulated import Simulation, simulation_checkpoint_dir
from bagel_model.stage import split_layers

from .args import AppArgs, with_gpu_shares
from .decoder import Decoder
from .devices import placed_device, resolve_dtype
from .encoder import Encoder
from .image_store import ImageStoreDeployment
from .orchestrator import Orchestrator
from .plan import gpu_memory_bytes, with_plan
from .routing import STATS_PERIOD_S, PrefixAffinityRouter
from .topology import Cluster, Shares, Topology, TopologyError, check_fits, replica_bundles

log = logging.getLogger("ray.serve")


def build_app(args: dict | AppArgs | None = None) -> Application:
    a = args if isinstance(args, AppArgs) else AppArgs(**(args or {}))
    simulation = Simulation.named(a.simulate, a.simulate_time_scale) if a.simulate else None
    if simulation is not None:  # the full-size model's shapes, bf16 bytes, no GPU
        a = a.model_copy(update={"checkpoint_dir": a.checkpoint_dir or str(simulation_checkpoint_dir()),
                                 "dtype": "bfloat16" if a.dtype == "auto" else a.dtype, "device": "cpu"})
    cluster = cluster_info(a) if simulation is None else Cluster(())
    pipelines = (a.autoscaling_config.max_replicas if a.autoscaling_config else a.num_replicas) * a.cfg_parallel
    a, _ = with_plan(a, cluster.gpus / pipelines)  # each pipeline plans for its share of the GPUs
    a = with_gpu_shares(a, cluster.gpus)
    check_topology(a, cluster)
    checkpoint = a.checkpoint_dir
    replicas = ({"autoscaling_config": a.autoscaling_config.model_dump(exclude_none=True)}
                if a.autoscaling_config else {"num_replicas": a.num_replicas})
    enc_device, dec_device = placed_device(a.device, a.encoder_gpus), placed_device(a.device, a.decoder_gpus)
    encoder = Encoder.options(ray_actor_options={"num_cpus": 0, "num_gpus": a.encoder_gpus}, **replicas).bind(
        checkpoint, enc_device, resolve_dtype(a.dtype, enc_device), a.random_weights,
        a.quantize if a.quantize_vit else None, simulation)
    decoder = Decoder.options(ray_actor_options={"num_cpus": 0, "num_gpus": a.decoder_gpus}, **replicas).bind(
        checkpoint, dec_device, a.random_weights, simulation)
    routing = {"request_router_config": RequestRouterConfig(
        request_router_class=PrefixAffinityRouter, request_routing_stats_period_s=STATS_PERIOD_S)} \
        if a.prefix_cache else {}
    ingress = Orchestrator.options(placement_group_bundles=replica_bundles(a.topology, a.gpus_per_stage),
                                   placement_group_strategy=a.placement_strategy, **replicas, **routing)
    # One store for all replicas: a URL answers whichever replica receives its GET.
    store = ImageStoreDeployment.bind(a.image_url_store_bytes, a.image_url_store_images, a.image_url_ttl_s)
    return ingress.bind(a, encoder, decoder, store)


def cluster_info(a: AppArgs) -> Cluster:
    """GPUs per alive node of the connected Ray cluster (none without Ray), and the memory of
    one GPU where known (`gpu_memory_gib`, else this machine's first GPU)."""
    if not ray.is_initialized():
        return Cluster(())
    nodes = tuple(int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive"))
    return Cluster(nodes, gpu_memory_bytes(a) if any(nodes) else None)


def check_topology(a: AppArgs, cluster: Cluster) -> None:
    """Raise `TopologyError` when the replicas (the most that autoscaling may start) cannot be
    placed; with autoscaling, placing only `min_replicas` is enough (a warning names the rest)."""
    if a.gpus_per_stage <= 0:
        return
    config = BagelConfig.from_checkpoint_dir(checkpoint_or_demo(a.checkpoint_dir))
    dtype = resolve_dtype(a.dtype, "cuda")

    @lru_cache(maxsize=None)
    def weights(stages: int, sizes: tuple[int, ...] | None = None) -> tuple[int, ...]:
        specs = split_layers(config.llm.num_hidden_layers, stages, list(sizes) if sizes else None)
        return tuple(stage_weight_bytes(config, spec, a.quantize, dtype) for spec in specs)

    shares = Shares(a.gpus_per_stage, a.encoder_gpus, a.decoder_gpus)
    configured = weights(a.num_stages, tuple(a.layer_sizes) if a.layer_sizes else None)

    def check(topology: Topology) -> None:
        check_fits(topology, shares, cluster, configured, weights, a.placement_strategy, a.stage_memory_fraction)

    try:
        check(a.topology)
    except TopologyError:
        if a.autoscaling_config is None:
            raise
        check(Topology(a.autoscaling_config.min_replicas, a.cfg_parallel, a.num_stages))
        log.warning("autoscaling: %d replicas of %s do not all fit %s; replicas beyond those that fit wait for GPUs",
                    a.autoscaling_config.max_replicas, a.topology, cluster.describe())
