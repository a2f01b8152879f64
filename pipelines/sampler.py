"""The Euler flow-matching sampler with classifier-free guidance (spec §5.4).

One `executor.denoise` call per step carries every branch the step needs; the latent state `x`
(float32, on the executor's device) is updated as x <- x - (t_i - t_{i+1}) * v.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bagel_model.segments import Segment

from .context import Context
from .executor import Executor
from .guidance import Branch, branches_for_step, combine
from .params import ImageParams
from .schedule import timesteps


@dataclass(frozen=True)
class StepProgress:
    """Emitted after every denoising step."""

    step: int  # 1-based
    num_steps: int
    t: float
    velocities: dict[Branch, Tensor]  # per branch, before guidance
    v: Tensor  # guided velocity
    x: Tensor  # latent tokens after the step


def sample_image(executor: Executor, contexts: dict[Branch, Context], grid: tuple[int, int],
                 params: ImageParams, x: Tensor,
                 on_step: Callable[[StepProgress], None] | None = None) -> Tensor:
    """Denoise latent tokens `x` [h*w, patch_latent_dim] from t = 1 to 0; returns them."""
    ts = timesteps(params.num_timesteps, params.timestep_shift)
    dts = (ts[:-1] - ts[1:]).to(executor.device)
    x = x.to(executor.device, torch.float32)
    same_as_cond = contexts[Branch.CFG_IMG].history == contexts[Branch.COND].history
    for i in range(len(ts) - 1):
        t = float(ts[i])
        branches = branches_for_step(t, params)
        # A branch whose context holds exactly what COND holds has COND's velocity.
        run = [b for b in branches if not (b is Branch.CFG_IMG and same_as_cond)]
        segments = [Segment.noise(contexts[b].context_id, x, grid, t, contexts[b].rope_pos) for b in run]
        velocities = dict(zip(run, executor.denoise(segments)))
        if Branch.CFG_IMG in branches and same_as_cond:
            velocities[Branch.CFG_IMG] = velocities[Branch.COND]
        v = combine(velocities, params)
        x = x - v * dts[i]
        if on_step is not None:
            on_step(StepProgress(i + 1, len(ts) - 1, t, velocities, v, x))
    return x
