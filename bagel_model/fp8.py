"""APPROXIMATE opt-in mode: hand-written FP8 (e4m3) GEMMs for the generation expert's MLP.

The generation expert's MLP holds ~70% of a denoising forward's FLOPs. `quantize_gen_mlp`
replaces it in every layer by `Fp8SwiGLU`: weights quantised once per output channel,
activations per token at run time, products accumulated by `torch._scaled_mm` (FP8 tensor
cores, H100 and later). Elsewhere the same quantised numbers are multiplied in float32, so CPU
tests see the same rounding. Outputs differ from the exact model: benchmarks report by how much.

`quantize: fp8` (quantize.py) is the maintained equivalent (torchao's float8 rowwise) for every
linear layer; this path stays selectable until bench/quant.py has measured which is faster.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import layers
from .errors import InvalidRequest
from .kernels import silu_mul
from .model import BagelStage

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (FP8 values [M, K], float32 scales [M, 1]) with x ~= values * scales."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def silu_mul_quantized(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return quantize_rows(silu_mul(gate, up))


@functools.cache
def activation_kernels(compiled: bool) -> tuple[Callable, Callable]:
    """(quantize_rows, silu_mul_quantized), plain or torch.compile'd (one fused kernel each,
    compiled on first use)."""
    if not compiled:
        return quantize_rows, silu_mul_quantized
    return torch.compile(quantize_rows), torch.compile(silu_mul_quantized)


class Fp8Weight(nn.Module):
    """A Linear weight [N, K] (no bias) as FP8 values with per-output-channel scales."""

    def __init__(self, weight: Tensor):
        super().__init__()
        values, scale = quantize_rows(weight)
        self.register_buffer("values", values)  # [N, K]
        self.register_buffer("scale", scale.t().contiguous())  # [1, N]

    def matmul(self, xq: Tensor, x_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
        """(xq * x_scale) @ weight.T for FP8 rows xq [M, K] with scales [M, 1]."""
        if xq.is_cuda and torch.cuda.get_device_capability(xq.device) >= (8, 9):
            return torch._scaled_mm(xq, self.values.t(), scale_a=x_scale, scale_b=self.scale,
                                    out_dtype=out_dtype, use_fast_accum=True)
        return ((xq.float() * x_scale) @ (self.values.float() * self.scale.t()).t()).to(out_dtype)


class Fp8SwiGLU(nn.Module):
    """`layers.SwiGLU` with FP8 GEMMs (gate and up as one); `compiled`: the activation
    quantisation runs as torch.compile'd kernels (chosen when the stage is built)."""

    def __init__(self, mlp: layers.SwiGLU, compiled: bool = False):
        super().__init__()
        self.gate_up = Fp8Weight(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down = Fp8Weight(mlp.down_proj.weight)
        self.quantize_rows, self.silu_mul_quantized = activation_kernels(compiled)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        gate_up = self.gate_up.matmul(*self.quantize_rows(rows), x.dtype)
        out = self.down.matmul(*self.silu_mul_quantized(*gate_up.chunk(2, dim=-1)), x.dtype)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if residual is None else residual.add_(out)


@torch.no_grad()
def quantize_gen_mlp(stage: BagelStage, compiled: bool | None = None) -> BagelStage:
    """Replace every layer's `mlp_moe_gen` by its FP8 version (in place; frees the bf16 weights).
    `compiled` (default: on CUDA) picks the activation kernels."""
    compiled = stage.device.type == "cuda" if compiled is None else compiled
    if any(getattr(layer.mlp_moe_gen.gate_up, "packed", False) for layer in stage.language_model.model.layers.values()):
        raise InvalidRequest("the hand-written FP8 path needs the dense bf16 weights; these are already in another "
                             "format (quantize): use one or the other")
    for layer in stage.language_model.model.layers.values():
        layer.mlp_moe_gen = Fp8SwiGLU(layer.mlp_moe_gen, compiled)
    return stage
