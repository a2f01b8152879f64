"""Optional kernels for a built stage, chosen explicitly by whoever builds it (nothing here is
process-wide): FlashAttention-4 for attention (`attention="fa4"`), and quack GEMMs with the
SwiGLU and the residual add fused into their epilogues for the MLPs (`mlp="quack"`). Both come
from optional packages for Hopper/Blackwell GPUs; where a package or such a GPU is missing the
default kernels run (logged), so the same choice works on every machine.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from . import epilogue_gemm
from .attention import ATTENTION_BACKENDS, attention_backend
from .layers import SwiGLU
from .mot import MoTAttention

log = logging.getLogger(__name__)

MLP_BACKENDS = ("cublas", "quack")


@dataclass(frozen=True)
class KernelChoice:
    attention: str = "sdpa"  # one of attention.ATTENTION_BACKENDS
    mlp: str = "cublas"  # one of MLP_BACKENDS

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, not {self.attention!r}")
        if self.mlp not in MLP_BACKENDS:
            raise ValueError(f"mlp must be one of {MLP_BACKENDS}, not {self.mlp!r}")


def use_kernels(stage: nn.Module, choice: KernelChoice) -> KernelChoice:
    """Put `choice` into every decoder layer of `stage` (after its weights are on their device);
    returns the choice actually in effect after fallbacks."""
    device = next(stage.parameters()).device
    attention, attend = attention_backend(choice.attention, device)
    mlp, fused = "cublas", None
    if choice.mlp == "quack":
        reason = epilogue_gemm.quack_unavailable(device)
        if reason is None:
            mlp, fused = "quack", epilogue_gemm.EpilogueSwiGLU()
        else:
            log.warning("mlp: quack GEMMs %s; using cuBLAS", reason)
    for module in stage.modules():
        if isinstance(module, MoTAttention):
            module.attend = attend
        elif isinstance(module, SwiGLU):
            module.fused = fused
    return KernelChoice(attention, mlp)
