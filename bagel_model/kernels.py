"""The kernels a stage runs: chosen by whoever builds the stage, held by its modules.

A `KernelChoice` names them: the elementwise kernels (RMSNorm, SiLU * mul, qk-norm + RoPE,
residual add + RMSNorm, masked softmax) plain or fused by `torch.compile` (worth it on GPUs,
where they are memory-bound); the attention backend (PyTorch SDPA, or FlashAttention-4 from the
optional `flash-attn-4` package); the MLP GEMMs (cuBLAS, or quack GEMMs with the SwiGLU and the
residual add in their epilogues, `epilogue_gemm.py`); the layer norms of packed forwards (ours,
or quack's RMSNorm). `select_kernels` turns a choice into
`Kernels` for a device, falling back (logged) where an optional package or GPU is missing, so the
same choice works on every machine. Pass `Kernels` to `BagelStage` (or `loader.load_stage`), or
swap them into a built stage with `use_kernels`. Nothing process-wide changes: two stages in one
process may run different kernels. Another kernel is one more field of both classes.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import epilogue_gemm
from .attention import ATTENTION_BACKENDS, Attend, attend, attention_backend

log = logging.getLogger(__name__)

MLP_BACKENDS = ("cublas", "quack")
NORM_BACKENDS = ("torch", "quack")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Normalise in float32, cast back to the input dtype, then scale (Qwen2 semantics)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split ("NeoX") rotary embedding. x: [T, heads, head_dim]; cos, sin: [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def qk_norm_rope(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor) -> Tensor:
    """Per-head RMSNorm of queries or keys [T, heads, head_dim], then RoPE."""
    return apply_rope(rms_norm(x, weight, eps), cos, sin)


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual update x + delta and its RMSNorm, in one pass when compiled."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def masked_softmax(scores: Tensor, bias: Tensor, scale: float) -> Tensor:
    """softmax(scores * scale + bias) in float32, returned in the scores' dtype."""
    return (scores.float() * scale + bias).softmax(-1).to(scores.dtype)


@dataclass(frozen=True)
class KernelChoice:
    attention: str = "sdpa"  # one of attention.ATTENTION_BACKENDS
    mlp: str = "cublas"  # one of MLP_BACKENDS
    compile: bool | None = None  # fused compiled elementwise kernels; None: on CUDA devices
    norm: str = "torch"  # one of NORM_BACKENDS: `Kernels.rms_norm`

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, not {self.attention!r}")
        if self.mlp not in MLP_BACKENDS:
            raise ValueError(f"mlp must be one of {MLP_BACKENDS}, not {self.mlp!r}")
        if self.norm not in NORM_BACKENDS:
            raise ValueError(f"norm must be one of {NORM_BACKENDS}, not {self.norm!r}")


# A fused MLP: (the SwiGLU module, x, residual or None) -> its output, as `SwiGLU.plain` computes it.
FusedMLP = Callable[[nn.Module, Tensor, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class Kernels:
    choice: KernelChoice  # the choice in effect (after fallbacks)
    rms_norm: Callable[[Tensor, Tensor, float], Tensor]
    silu_mul: Callable[[Tensor, Tensor], Tensor]
    qk_norm_rope: Callable[[Tensor, Tensor, float, Tensor, Tensor], Tensor]
    add_rms_norm: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
    masked_softmax: Callable[[Tensor, Tensor, float], Tensor]
    attend: Attend  # one packed segment, as `attention.attend`
    mlp: FusedMLP | None = None  # None: `SwiGLU.plain` (cuBLAS GEMMs and `silu_mul`)


class QuackRMSNorm:
    """`Kernels.rms_norm` by quack's RMSNorm (a CuTe DSL kernel: 1.43x our compiled kernel on the
    denoising shape, bench/results/kernels_h200.json) for 2-D bf16/fp16 CUDA inputs, `fallback`
    for the rest. quack scales by the weight before its one rounding to bf16; `rms_norm` rounds,
    then scales: results differ at the bf16 rounding level (bench/side_by_side.py checks the
    whole model against the default path)."""

    def __init__(self, fallback: Callable[[Tensor, Tensor, float], Tensor]):
        self.fallback = fallback

    def __call__(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        if not x.is_cuda or x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16) or x.stride(-1) != 1:
            return self.fallback(x, weight, eps)
        from quack import rmsnorm

        return rmsnorm(x, weight, eps=eps)


EAGER = Kernels(KernelChoice(compile=False), rms_norm, silu_mul, qk_norm_rope, add_rms_norm, masked_softmax, attend)


@functools.cache
def _compiled() -> Kernels:
    """The elementwise kernels as fused `torch.compile`d functions (same math). Shapes start
    static and become dynamic only in the dimensions seen changing (the token count), so inner
    strides stay known and loads vectorise. Compilation happens at each kernel's first call."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return replace(EAGER, choice=KernelChoice(compile=True), rms_norm=torch.compile(rms_norm),
                   silu_mul=torch.compile(silu_mul), qk_norm_rope=torch.compile(qk_norm_rope),
                   add_rms_norm=torch.compile(add_rms_norm), masked_softmax=torch.compile(masked_softmax))


def select_kernels(device: torch.device | str, choice: KernelChoice = KernelChoice()) -> Kernels:
    """The kernels `choice` names, for a stage on `device`; an optional kernel that cannot run
    there falls back to the default one (logged), and `Kernels.choice` says what runs."""
    device = torch.device(device)
    compile = device.type == "cuda" if choice.compile is None else choice.compile
    base = _compiled() if compile else EAGER
    attention, attend_fn = attention_backend(choice.attention, device)
    mlp, fused = "cublas", None
    if choice.mlp == "quack":
        reason = epilogue_gemm.quack_unavailable(device)
        if reason is None:
            mlp, fused = "quack", epilogue_gemm.EpilogueSwiGLU()
        else:
            log.warning("mlp: quack GEMMs %s; using cuBLAS", reason)
    norm, norm_fn = "torch", base.rms_norm
    if choice.norm == "quack":
        reason = epilogue_gemm.quack_unavailable(device)
        if reason is None:
            norm, norm_fn = "quack", QuackRMSNorm(base.rms_norm)
        else:
            log.warning("norm: quack's RMSNorm %s; using ours", reason)
    return replace(base, choice=KernelChoice(attention, mlp, compile, norm), attend=attend_fn, mlp=fused,
                   rms_norm=norm_fn)


def use_kernels(stage: nn.Module, choice: KernelChoice) -> KernelChoice:
    """Swap the kernels `choice` names into every module of a built stage (its weights on their
    device); returns the choice in effect."""
    kernels = select_kernels(next(stage.parameters()).device, choice)
    for module in stage.modules():
        if isinstance(getattr(module, "kernels", None), Kernels):
            module.kernels = kernels
    return kernels.choice
