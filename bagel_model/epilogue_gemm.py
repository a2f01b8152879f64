"""GEMMs with fused epilogues from the optional `quack-kernels` package (CuTe DSL kernels for
Hopper and Blackwell), for the MLP:

- gate/up with SiLU(gate) * up computed in the epilogue: the [T, 2 x intermediate] GEMM output
  is never written, and the separate SwiGLU kernel goes;
- down with the residual add in the epilogue (as `layers.add_linear_` does with cuBLAS).

The same maths as the default path. The SwiGLU is computed from the float32 accumulators rather
than from bf16-rounded gate and up values: one rounding fewer, so results differ from cuBLAS +
the SwiGLU kernel at the bf16 rounding level (checked against float32 by bench/kernels.py).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

# Below this many tokens (decode steps, the two marker tokens of an image) the GEMMs are tiny
# and cuBLAS's small-matrix kernels are the better choice.
MIN_TOKENS = 256


@functools.cache
def _quack():
    from quack import gemm_interface
    return gemm_interface


def quack_unavailable(device: torch.device) -> str | None:
    """Why the quack GEMMs cannot run on `device`, or None when they can."""
    if device.type != "cuda":
        return f"needs a CUDA GPU, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"is used here for compute capability 9.x and 10.x only, not {major}.{minor}"
    try:
        _quack()
    except Exception as e:  # ImportError, or the DSL failing to load its libraries
        return f"quack-kernels does not import: {type(e).__name__}: {e}"
    return None


def swiglu_gate_up(x: Tensor, gate_up_weight: Tensor, tuned: bool = True) -> Tensor:
    """silu(x @ gate^T) * (x @ up^T) for `gate_up_weight` = [gate; up] ([2H, D]): [T, H]."""
    _, h = _quack().gemm_act(x, gate_up_weight.t(), activation="swiglu", store_preact=False,
                             concat_layout=("B",), tuned=tuned)
    return h


def add_linear_(residual: Tensor, x: Tensor, weight: Tensor, tuned: bool = True) -> Tensor:
    """residual += x @ weight^T in place, the add in the GEMM's epilogue."""
    _quack().gemm_add_inplace(x, weight.t(), residual, tuned=tuned)
    return residual


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, tuned: bool = True) -> Tensor:
    """x @ weight^T + bias."""
    return _quack().gemm(x, weight.t(), bias=bias, tuned=tuned)


class EpilogueSwiGLU:
    """A fused MLP (`Kernels.mlp`): both MLP GEMMs through quack for bf16/fp16 CUDA inputs of
    at least `min_tokens` tokens, `SwiGLU.plain` for the rest. `tuned` runs quack's autotuner
    on the first call of each shape (tens of seconds; it happens in the eager step that precedes
    any CUDA-graph capture of the same shapes). Quantized or compressed weights (a packed
    gate/up, bagel_model/quantize.py) keep their own GEMMs."""

    def __init__(self, tuned: bool = True, min_tokens: int = MIN_TOKENS):
        self.tuned, self.min_tokens = tuned, min_tokens

    def __call__(self, mlp: nn.Module, x: Tensor, residual: Tensor | None) -> Tensor:
        """`mlp`: the `layers.SwiGLU` (not imported: layers imports kernels, which imports this)."""
        if x.shape[0] < self.min_tokens or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) \
                or mlp.gate_up.packed:
            return mlp.plain(x, residual)
        h = swiglu_gate_up(x, mlp.gate_up.params()[0], self.tuned)
        if residual is None:
            return linear(h, mlp.down_proj.weight, None, self.tuned)
        return add_linear_(residual, h, mlp.down_proj.weight, self.tuned)
