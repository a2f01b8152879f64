"""`num_stages: auto` and `quantize: auto`: the memory planner (bagel_model/memory_plan.py)
chooses them for the cluster's GPUs, with one request at the model's largest image size as the
least that must fit; the KV budget (`kv_cache_bytes`, unless set) gets the memory left over."""
from __future__ import annotations

import logging

import torch

from bagel_model.config import BagelConfig
from bagel_model.demo import checkpoint_or_demo
from bagel_model.errors import InvalidRequest
from bagel_model.memory_plan import GiB, Plan, plan_memory
from bagel_model.stage import split_layers

from .args import AppArgs

logger = logging.getLogger("bagel_serve")


def gpu_memory_bytes(args: AppArgs) -> int | None:
    """The memory to plan for per GPU: `gpu_memory_gib`, else the first local GPU's."""
    if args.gpu_memory_gib:
        return int(args.gpu_memory_gib * GiB)
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def plan_for(args: AppArgs, gpus: float) -> Plan | None:
    """The plan for these args on `gpus` GPUs (None without GPUs or known GPU memory). Raises
    InvalidRequest when the args cannot fit."""
    memory = gpu_memory_bytes(args)
    if int(gpus) < 1 or memory is None:
        return None
    config = BagelConfig.from_checkpoint_dir(checkpoint_or_demo(args.checkpoint_dir))
    stages, sizes = None, None
    if args.num_stages != "auto":  # the split the app will make
        stages = args.num_stages
        sizes = [len(s.layers) for s in split_layers(config.llm.num_hidden_layers, stages, args.layer_sizes)]
    return plan_memory(config, int(gpus), memory, num_stages=stages, quantize=args.quantize,
                       quantize_vit=args.quantize_vit, layer_sizes=sizes)


def split_kv_room(args: AppArgs, kv_bytes: int) -> dict:
    """The planned KV room per stage, shared: the prefix cache (when on) gets at most a quarter
    of it, running requests the rest, so the two never add up to more than the plan has."""
    if not args.prefix_cache:
        return {"kv_cache_bytes": kv_bytes}
    cache = max(min(args.prefix_cache_bytes, kv_bytes // 4), 1)
    if cache < args.prefix_cache_bytes:
        logger.info("prefix cache budget %.2f GiB (a quarter of the planned KV room)", cache / 2**30)
    return {"kv_cache_bytes": kv_bytes - cache, "prefix_cache_bytes": cache}


def with_plan(args: AppArgs, gpus: float) -> tuple[AppArgs, Plan | None]:
    """`args` with its auto fields chosen by the planner (without GPUs: one exact stage), and
    the plan they follow. A layout set by hand that the planner thinks too large is only
    warned about (the planner plans for the largest images)."""
    auto = args.num_stages == "auto" or args.quantize == "auto"
    try:
        plan = plan_for(args, gpus)
    except InvalidRequest as e:
        if auto:
            raise
        logger.warning("the configured layout may not fit the GPUs: %s", e)
        plan = None
    update: dict = {}
    if plan is None:
        update = {"num_stages": 1 if args.num_stages == "auto" else args.num_stages,
                  "quantize": None if args.quantize == "auto" else args.quantize}
    elif auto:
        update = {"num_stages": plan.num_stages, "quantize": plan.quantize}
        if args.num_stages == "auto" and args.layer_sizes is None:
            update["layer_sizes"] = plan.layer_sizes
        if args.kv_cache_bytes is None:
            update.update(split_kv_room(args, plan.kv_cache_bytes))
    if plan is not None:
        logger.info("%s", plan.describe())
    return args.model_copy(update=update), plan
