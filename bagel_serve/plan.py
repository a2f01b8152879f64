"""`bagel plan`: which layout (stages, weight format, KV budget) fits these GPUs, with the memory
arithmetic (bagel_model/memory_plan.py).

    bagel plan --gpus 1 --gpu-memory 24               # one 24 GB card
    bagel plan --gpus 3 --gpu-memory 24 --concurrency 4 --size 1024
"""
from __future__ import annotations

import argparse

def quantize_choices() -> tuple[str, ...]:
    """--quantize's choices: none (exact), the weight formats of bagel_model/quantize.py, auto."""
    from bagel_model.weight_formats import MODES

    return ("none", *MODES, "auto")


def quantize_arg(text: str | None) -> str | None:
    """The `quantize` value of a --quantize choice ("none": exact)."""
    return None if text in (None, "none") else text


def add_plan(subparsers) -> None:
    p = subparsers.add_parser("plan", help="plan stages, weight format and KV budget for the GPUs",
                              description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, metavar="N", help="GPUs (default: this machine's)")
    p.add_argument("--gpu-memory", type=float, metavar="GIB",
                   help="memory per GPU in GiB, e.g. 24 (default: this machine's first GPU's)")
    p.add_argument("--concurrency", type=int, default=1, metavar="C",
                   help="requests whose KV cache must fit at once (default: 1)")
    p.add_argument("--size", type=int, metavar="PX", help="image side in pixels (default: the model's largest)")
    p.add_argument("--stages", type=int, metavar="N", help="pipeline stages (default: the planner's choice)")
    p.add_argument("--quantize", choices=quantize_choices(), default="auto",
                   help="weight format (default: auto = exact bf16 if it fits, else df11, int8, nf4)")
    p.add_argument("--quantize-vit", action="store_true", help="the ViT in the same format")
    p.add_argument("--local", action="store_true",
                   help="everything in one process on one GPU (the CLI's generate/edit/understand) instead of "
                        "the service's stage, encoder and decoder processes")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="plan for this checkpoint's configuration (default: BAGEL-7B-MoT's)")
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    import torch

    from bagel_model.config import BagelConfig
    from bagel_model.errors import InvalidRequest
    from bagel_model.memory_plan import GiB, Workload, plan_memory

    gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
    if gpus < 1:
        raise InvalidRequest("no GPU found: pass --gpus N (and --gpu-memory GIB)")
    if args.gpu_memory is not None:
        memory = int(args.gpu_memory * GiB)
    elif torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory
    else:
        raise InvalidRequest("no GPU found to read its memory from: pass --gpu-memory GIB")
    if args.concurrency < 1:
        raise InvalidRequest(f"--concurrency must be at least 1, got {args.concurrency}")
    config = BagelConfig.from_checkpoint_dir(args.checkpoint) if args.checkpoint else BagelConfig()
    if args.size is not None and not config.latent_downsample <= args.size <= config.max_image_side:
        raise InvalidRequest(f"--size must be in [{config.latent_downsample}, {config.max_image_side}], got {args.size}")
    plan = plan_memory(config, gpus, memory, Workload(args.concurrency, args.size), num_stages=args.stages,
                       quantize=quantize_arg(args.quantize), quantize_vit=args.quantize_vit,
                       processes="local" if args.local else "serve")
    print(plan.describe())
    return 0
