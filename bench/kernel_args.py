"""The benchmarks' flags for the optional kernels (`bagel_model/kernels.py`) and for the
site folder that the GPU machine's carried packages were installed into
(bench/carry_kernels.sh, bench/install_kernels.sh).

The CuTe DSL finds its modules through a `.pth` file in that folder, which only
`site.addsitedir` runs; the folders it adds also go on PYTHONPATH, so that worker processes
(quack compiles kernels in a process pool) see the same packages.
"""
from __future__ import annotations

import argparse
import os
import site
import sys

from torch import nn

from bagel_model.attention import ATTENTION_BACKENDS
from bagel_model.kernels import MLP_BACKENDS, NORM_BACKENDS, KernelChoice, use_kernels


def add_kernel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default="sdpa",
                   help="attention kernels: PyTorch SDPA, or FlashAttention-4 (package flash-attn-4)")
    p.add_argument("--mlp", choices=MLP_BACKENDS, default="cublas",
                   help="MLP GEMMs: cuBLAS + fused SwiGLU kernel, or quack GEMMs with SwiGLU/residual epilogues")
    p.add_argument("--norm", choices=NORM_BACKENDS, default="torch",
                   help="RMSNorm of packed forwards: ours (compiled on GPUs), or quack's (package quack-kernels)")
    p.add_argument("--site", action="append", default=[], metavar="DIR",
                   help="site folder with carried kernel packages (repeatable)")


def add_site_dirs(folders: list[str]) -> None:
    before = set(sys.path)
    for folder in folders:
        site.addsitedir(folder)
    added = [p for p in sys.path if p not in before]
    if added:
        os.environ["PYTHONPATH"] = os.pathsep.join(added + [p for p in [os.environ.get("PYTHONPATH")] if p])


def quack_settings() -> None:
    """quack's autotuner compiles candidate kernels in a process pool (8 workers unless told):
    use the machine's cores, and keep its choices on disk so that later runs on the same
    machine (the next benchmark call) skip the tuning."""
    os.environ.setdefault("QUACK_COMPILE_WORKERS", str(max(1, (os.cpu_count() or 2) - 2)))
    os.environ.setdefault("QUACK_CACHE_AUTOTUNING", "1")


def kernel_choice(args: argparse.Namespace, compile: bool) -> KernelChoice:
    """The kernels the flags name, with the compiled elementwise kernels or not (the carried
    packages made importable first)."""
    add_site_dirs(args.site)
    quack_settings()
    return KernelChoice(args.attention, args.mlp, compile, args.norm)


def apply_kernel_args(args: argparse.Namespace, stages: list[nn.Module], compile: bool) -> list[dict]:
    """Put the chosen kernels into built `stages`; returns the choice in effect in each."""
    choice = kernel_choice(args, compile)
    return [vars(use_kernels(stage, choice)) for stage in stages]
