"""The Euler flow-matching sampler with classifier-free guidance (spec §5.4).

Each step is one `executor.denoise(segments, step)` call: the segments carry every branch the
step evaluates, and `step` (an `EulerStep`, small and picklable) says how their velocities
combine and how far to move. The executor applies it where the velocities are, so the latent
state `x` (float32) never has to leave the device between steps: a remote executor may keep it
and return `x = None` until the final step.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from bagel_model.segments import Segment

from .context import Context
from .executor import Executor
from .guidance import Branch, branches_for_step, combine
from .params import ImageParams
from .schedule import timesteps


@dataclass(frozen=True)
class EulerStep:
    """One step's guidance and update: x <- x - dt * combine(velocities)."""

    run: tuple[Branch, ...]  # the branches evaluated, in segment order (COND first)
    same_as_cond: tuple[Branch, ...]  # branches the step needs whose velocity is COND's
    params: ImageParams
    dt: float
    final: bool  # the last step: the executor returns the latents
    estimated: tuple[Branch, ...] = ()  # APPROXIMATE (cfg_refresh_interval > 1): not run this step

    def apply(self, x: Tensor, velocities: list[Tensor], differences: dict[Branch, Tensor]) -> StepOutput:
        """`x` float32 [tokens, channels] and the run branches' velocities -> the step's output.
        `differences` is the image's v_cond - v_branch of the last step that ran each guidance
        branch, kept by the executor between steps; used and updated only with
        cfg_refresh_interval > 1."""
        by_branch = dict(zip(self.run, velocities))
        v_cond = by_branch[Branch.COND]
        for branch in self.estimated:
            by_branch[branch] = v_cond.float() - differences[branch]
        if self.params.cfg_refresh_interval > 1:
            differences.update({b: v_cond.float() - v.float() for b, v in by_branch.items()
                                if b in self.run and b is not Branch.COND})
        for branch in self.same_as_cond:
            by_branch[branch] = v_cond
        v = combine(by_branch, self.params)
        return StepOutput(x - v * self.dt, v, by_branch)


@dataclass(frozen=True)
class StepOutput:
    """What a denoise call returns. A remote executor that keeps the state on its device returns
    `StepOutput()` for every step but the final one (whose `x` it always returns)."""

    x: Tensor | None = None  # latent tokens after the step (float32)
    v: Tensor | None = None  # guided velocity
    velocities: dict[Branch, Tensor] | None = None  # per branch, before guidance


@dataclass(frozen=True)
class StepProgress:
    """Emitted after every denoising step (tensors: None where the executor keeps them)."""

    step: int  # 1-based
    num_steps: int
    t: float
    velocities: dict[Branch, Tensor] | None
    v: Tensor | None
    x: Tensor | None


def sample_image(executor: Executor, contexts: dict[Branch, Context], grid: tuple[int, int],
                 params: ImageParams, x: Tensor,
                 on_step: Callable[[StepProgress], None] | None = None) -> Tensor:
    """Denoise latent tokens `x` [h*w, patch_latent_dim] from t = 1 to 0; returns them (float32)."""
    ts = timesteps(params.num_timesteps, params.timestep_shift)
    x = x.float()
    num_steps = len(ts) - 1
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
        step = EulerStep(run, aliased, params, float(ts[i] - ts[i + 1]), i == num_steps - 1, estimated)
        segments = [Segment.noise(contexts[b].context_id, x, grid, t, contexts[b].rope_pos) for b in run]
        out = executor.denoise(segments, step)
        x = out.x
        if on_step is not None:
            on_step(StepProgress(i + 1, num_steps, t, out.velocities, out.v, out.x))
    return x
