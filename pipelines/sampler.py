"""The Euler flow-matching sampler with classifier-free guidance (spec §5.4).

Each step is one `executor.denoise(segments, step)` call: the segments carry every branch the
step evaluates, and `step` (an `EulerStep`, pipelines/step.py) says how their velocities combine
and how far to move. The executor keeps the image's latents (float32) where the velocities are
and applies the step there, so they never have to leave the device between steps: only the
first step sends them, and a remote executor returns them only after the final step.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from bagel_model.segments import Segment

from .context import Context
from .executor import Executor
from .guidance import Branch, branches_for_step
from .params import ImageParams
from .previews import preview_steps
from .schedule import timesteps
from .step import EulerStep, StepProgress


def sample_image(executor: Executor, contexts: dict[Branch, Context], grid: tuple[int, int],
                 params: ImageParams, x: Tensor,
                 on_step: Callable[[StepProgress], None] | None = None, previews: int = 0) -> Tensor:
    """Denoise latent tokens `x` [h*w, patch_latent_dim] from t = 1 to 0; returns them (float32).
    `previews`: that many steps, evenly spread, report their predicted clean latents to `on_step`."""
    ts = timesteps(params.num_timesteps, params.timestep_shift)
    x = x.float()
    num_steps = len(ts) - 1
    preview_at = set(preview_steps(num_steps, previews))
    identical = contexts[Branch.CFG_IMG].history == contexts[Branch.COND].history
    guided = 0  # guided steps so far
    for i in range(num_steps):
        t = float(ts[i])
        branches = branches_for_step(t, params)
        # A branch whose context holds exactly what COND holds has COND's velocity.
        aliased = tuple(b for b in branches if b is Branch.CFG_IMG and identical)
        run = tuple(b for b in branches if b not in aliased)
        estimated = ()
        if len(branches) > 1:
            if guided % params.cfg_refresh_interval:
                run, estimated = (Branch.COND,), run[1:]
            guided += 1
        step = EulerStep(index=i, t=t, dt=float(ts[i] - ts[i + 1]), run=run, same_as_cond=aliased, params=params,
                         final=i == num_steps - 1, estimated=estimated)
        latents = x if i == 0 else None
        segments = [Segment.noise(contexts[b].context_id, latents, grid, t, contexts[b].rope_pos) for b in run]
        out = executor.denoise(segments, step)
        clean = executor.predicted_clean(contexts[Branch.COND].context_id) if i in preview_at else None
        if on_step is not None:
            on_step(StepProgress(i + 1, num_steps, t, out.velocities, out.v, out.x, clean))
    return out.x
