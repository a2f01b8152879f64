"""The shifted flow-matching time schedule and the CFG interval gate (spec §5.4)."""
from __future__ import annotations

import torch
from torch import Tensor


def timesteps(num_timesteps: int, timestep_shift: float) -> Tensor:
    """float32 [num_timesteps]: s*u / (1 + (s-1)*u) for u = linspace(1, 0); the sampler
    evaluates the model at the first num_timesteps - 1 of them."""
    u = torch.linspace(1, 0, num_timesteps)
    return timestep_shift * u / (1 + (timestep_shift - 1) * u)


def cfg_active(t: float, cfg_interval: tuple[float, float]) -> bool:
    """Guidance runs at shifted time t iff start < t <= end."""
    return cfg_interval[0] < t <= cfg_interval[1]
