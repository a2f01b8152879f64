"""The benchmarks' flags for the optional kernels (`bagel_model/kernel_choice.py`) and for the
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
from bagel_model.kernel_choice import MLP_BACKENDS, KernelChoice, use_kernels


def add_kernel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default="sdpa",
                   help="attention kernels: PyTorch SDPA, or FlashAttention-4 (package flash-attn-4)")
    p.add_argument("--mlp", choices=MLP_BACKENDS, default="cublas",
                   help="MLP GEMMs: cuBLAS + fused SwiGLU kernel, or quack GEMMs with SwiGLU/residual epilogues")
    p.add_argument("--site", action="append", default=[], metavar="DIR",
                   help="site folder with carried kernel packages (repeatable)")


def add_site_dirs(folders: list[str]) -> None:
    before = set(sys.path)
    for folder in folders:
        site.addsitedir(folder)
    added = [p for p in sys.path if p not in before]
    if added:
        os.environ["PYTHONPATH"] = os.pathsep.join(added + [p for p in [os.environ.get("PYTHONPATH")] if p])


def apply_kernel_args(args: argparse.Namespace, stages: list[nn.Module]) -> list[dict]:
    """Put the chosen kernels into `stages`; returns the choice in effect in each."""
    add_site_dirs(args.site)
    return [vars(use_kernels(stage, KernelChoice(args.attention, args.mlp))) for stage in stages]
