"""Small building blocks: RMSNorm, RoPE tables, SwiGLU MLP, timestep embedder, 2-D position tables.

Modules that run elementwise kernels take the stage's `Kernels` (kernels.py) when built."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import EAGER, Kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: Kernels = EAGER):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.kernels = eps, kernels

    def forward(self, x: Tensor) -> Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


class FusedLinear(nn.Module):
    """Several `nn.Linear`s reading the same input, run as one GEMM over their concatenated
    outputs. On first use their parameters become views into one concatenated tensor (no extra
    memory, names unchanged); if the parameters are replaced later (a new load, a move to another
    device), the concatenation is made again. `pack` instead stores the concatenation once, in
    another form (quantized or compressed): it becomes this module's own `weight` and the parts
    keep none."""

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        self.linears = linears  # a tuple: not registered, the parts keep their checkpoint names
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.packed = False

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, *self.params())

    def params(self) -> tuple[Tensor, Tensor | None]:
        """The concatenated weight (packed: in its stored form) and bias (None for bias-free
        linears)."""
        if not self.packed:
            first = self.linears[0].weight
            if self.weight is None or first.data_ptr() != self.weight.data_ptr() or first.device != self.weight.device:
                self._fuse()
        return self.weight, self.bias

    @torch.no_grad()
    def _fuse(self) -> None:
        self.weight = torch.cat([m.weight for m in self.linears])
        has_bias = self.linears[0].bias is not None
        self.bias = torch.cat([m.bias for m in self.linears]) if has_bias else None
        start = 0
        for m in self.linears:
            n = m.weight.shape[0]
            m.weight = nn.Parameter(self.weight[start:start + n], requires_grad=False)
            if has_bias:
                m.bias = nn.Parameter(self.bias[start:start + n], requires_grad=False)
            start += n

    @torch.no_grad()
    def pack(self, transform: Callable[[Tensor], Tensor]) -> None:
        """Store the concatenated weight as `transform(weight)` (the bias stays dense) and drop
        the parts' parameters."""
        weight = torch.cat([m.weight for m in self.linears])
        bias = torch.cat([m.bias for m in self.linears]) if self.linears[0].bias is not None else None
        for m in self.linears:
            m.weight = m.bias = None
        del self.weight, self.bias
        self.weight = nn.Parameter(transform(weight), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.packed = True


def add_linear_(residual: Tensor, x: Tensor, linear: nn.Linear) -> Tensor:
    """residual += linear(x) in place: as one GEMM that adds in its epilogue for dense weights
    (and lossless compressed ones, which decompress to the same dense tensor), else the
    quantized weight's own GEMM and an add (bias-free linear)."""
    assert linear.bias is None, "add_linear_ takes bias-free linears"
    weight = linear.weight
    if type(weight) in (Tensor, nn.Parameter) or getattr(weight, "lossless", False):
        return residual.addmm_(x, weight.t())
    return residual.add_(F.linear(x, weight))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases; gate and up run as one GEMM. With `residual`,
    the output is added to it in place (`add_linear_`) and returned. A fused MLP in the stage's
    kernels (`Kernels.mlp`) computes the same with GEMMs that fuse the SwiGLU and the residual
    add into their epilogues, and may hand inputs back to `plain`."""

    def __init__(self, dim: int, hidden: int, kernels: Kernels = EAGER):
        super().__init__()
        self.kernels = kernels
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_up = FusedLinear(self.gate_proj, self.up_proj)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        fused = self.kernels.mlp
        return self.plain(x, residual) if fused is None else fused(self, x, residual)

    def plain(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        h = self.kernels.silu_mul(*self.gate_up(x).chunk(2, dim=-1))
        return self.down_proj(h) if residual is None else add_linear_(residual, h, self.down_proj)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables [T, head_dim] for integer positions, computed in float32 then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> [cos(t f), sin(t f)] (frequency_size dims) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class PositionTable(nn.Module):
    """A fixed 2-D sin-cos table `pos_embed` [grid^2, dim], indexed by r * grid + c."""

    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, dim), requires_grad=False)

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.pos_embed[position_ids]


def sincos_2d_table(dim: int, grid: int) -> Tensor:
    """[grid^2, dim] float32: row r*grid+c = [sin(c w), cos(c w), sin(r w), cos(r w)],
    w_k = 10000^(-k/(dim/4)) (column coordinate first; spec §4.5)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    c = np.outer(cols.reshape(-1), omega)
    r = np.outer(rows.reshape(-1), omega)
    table = np.concatenate([np.sin(c), np.cos(c), np.sin(r), np.cos(r)], axis=1)
    return torch.from_numpy(table.astype(np.float32))


def grid_position_ids(h: int, w: int, grid: int, device: torch.device | None = None) -> Tensor:
    """Row-major position ids r * grid + c of an h x w patch grid placed at the table's corner."""
    r = torch.arange(h, device=device)[:, None]
    c = torch.arange(w, device=device)[None, :]
    return (r * grid + c).reshape(-1)
