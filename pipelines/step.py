"""The denoising-step protocol between the sampler and the executors, and the one owner of the
per-image sampler state (spec §5.4).

`sample_image` (pipelines/sampler.py) describes each step as an `EulerStep`: small and picklable,
it says which CFG branches run, how their velocities combine and how far to move. An executor
runs the branches' forwards and hands their velocities, each tagged by a `StepPart` (image,
step, branches), to the `SamplerStates` on the device where they land. That object alone keeps
an image's state between steps: its latents (float32, never leaving the device), the velocities
of the step being collected, and the differences the APPROXIMATE guidance refresh carries. It
applies a step once all its branches are in, whichever forwards brought them: one forward may
carry several images, and one image's branches may come in several forwards.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from bagel_model.segments import Segment, SegmentKind

from .guidance import Branch, combine
from .params import ImageParams


@dataclass(frozen=True)
class EulerStep:
    """Step `index` of an image's sampling: x <- x - dt * combine(velocities), at flow time t."""

    index: int  # 0-based; the image's state accepts only the velocities of its current step
    t: float
    dt: float
    run: tuple[Branch, ...]  # the branches evaluated, in segment order (COND first)
    same_as_cond: tuple[Branch, ...]  # branches the step needs whose velocity is COND's
    params: ImageParams
    final: bool  # the last step: the image's state ends and its latents are returned
    estimated: tuple[Branch, ...] = ()  # APPROXIMATE (cfg_refresh_interval > 1): not run this step


@dataclass(frozen=True)
class StepPart:
    """The branches of one image's step that one forward computes, in its segment order: the tag
    that ties those velocities to the image's state. `x0`, the initial latents, comes with the
    first part of the first step and starts the state."""

    key: str  # the image: its COND context id
    step: EulerStep
    branches: tuple[Branch, ...]
    x0: Tensor | None = None


@dataclass(frozen=True)
class StepOutput:
    """What applying a step gives. A remote executor that keeps the state on its device returns
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
    clean: Callable[[], Tensor] | None = None  # preview steps: the predicted clean latent tokens (waits for them)


@dataclass
class _Image:
    x: Tensor  # float32 latents before step `index`
    index: int = 0  # the step being collected
    velocities: dict[Branch, Tensor] = field(default_factory=dict)  # of step `index`, so far
    differences: dict[Branch, Tensor] = field(default_factory=dict)  # v_cond - v_branch, refresh only
    last: tuple[Tensor, Tensor, float] | None = None  # x_t, v and t of the last applied step


class SamplerStates:
    """The sampler state of every image denoised on one device, by image key."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._images: dict[str, _Image] = {}

    def keys(self) -> list[str]:
        """Images with live state (for stats and leak checks)."""
        return sorted(self._images)

    def latents(self, key: str) -> Tensor:
        """The image's latents before its current step (float32, on the device)."""
        return self._image(key).x

    def fill(self, parts: Sequence[StepPart], segments: list[Segment]) -> list[Segment]:
        """One forward's segments, noise segments without latents given their image's."""
        out = []
        for part, group in by_part(parts, segments):
            out += [replace(s, latents=self.latents(part.key)) if s.kind is SegmentKind.NOISE and s.latents is None
                    else s for s in group]
        return out

    def check(self, part: StepPart) -> None:
        """Raise what `collect` would for this part, before its forward runs (a batched forward
        leaves out the steps that cannot join it instead of failing them all)."""
        image = self._images.get(part.key)
        if part.x0 is not None:
            if image is not None:
                raise ValueError(f"image {part.key!r} is already being sampled")
            return
        if image is None:
            raise KeyError(f"no sampler state for image {part.key!r} (not started, finished or freed)")
        if part.step.index != image.index:
            raise ValueError(f"image {part.key!r} is at step {image.index}: "
                             f"velocities of step {part.step.index} cannot join it")

    def collect(self, parts: Sequence[StepPart], velocities: Sequence[Tensor]) -> dict[str, StepOutput]:
        """Take one forward's velocities (segment order, covered by `parts` in order) and apply
        the step of every image whose branches are now all in; returns those images' outputs.
        An image's state ends with its final step."""
        done = {}
        for part, vs in by_part(parts, velocities):
            self.check(part)
            if part.x0 is not None:
                self._images[part.key] = _Image(part.x0.to(self.device, torch.float32))
            image = self._images[part.key]
            stray = [b for b in part.branches if b not in part.step.run or b in image.velocities]
            if stray:
                raise ValueError(f"image {part.key!r}, step {image.index}: unexpected or repeated branches {stray}")
            image.velocities.update(zip(part.branches, vs))
            if len(image.velocities) == len(part.step.run):
                done[part.key] = self._apply(part.key, image, part.step)
        return done

    def predicted_clean(self, key: str) -> Tensor:
        """The clean latents the image's last applied step predicts, x_t - t * v (for previews)."""
        image = self._image(key)
        if image.last is None:
            raise ValueError(f"image {key!r} has no step applied yet")
        x, v, t = image.last
        return x - v * t

    def free(self, keys: Iterable[str]) -> None:
        """Drop the state of these images (unknown keys are ignored)."""
        for key in keys:
            self._images.pop(key, None)

    def _image(self, key: str) -> _Image:
        image = self._images.get(key)
        if image is None:
            raise KeyError(f"no sampler state for image {key!r} (not started, finished or freed)")
        return image

    def _apply(self, key: str, image: _Image, step: EulerStep) -> StepOutput:
        """The Euler update with guidance. `differences` holds each guidance branch's
        v_cond - v_branch of the last step that ran it; with cfg_refresh_interval > 1 a step
        that skips the branch estimates it from the fresh v_cond."""
        by_branch = {b: image.velocities[b] for b in step.run}
        v_cond = by_branch[Branch.COND]
        for branch in step.estimated:
            by_branch[branch] = v_cond.float() - image.differences[branch]
        if step.params.cfg_refresh_interval > 1:
            image.differences.update({b: v_cond.float() - v.float() for b, v in by_branch.items()
                                      if b in step.run and b is not Branch.COND})
        for branch in step.same_as_cond:
            by_branch[branch] = v_cond
        v = combine(by_branch, step.params)
        x = image.x - v * step.dt
        if step.final:
            del self._images[key]
        else:
            image.last, image.x, image.index, image.velocities = (image.x, v, step.t), x, step.index + 1, {}
        return StepOutput(x, v, by_branch)


def by_part(parts: Sequence[StepPart], items: Sequence) -> Iterator[tuple[StepPart, Sequence]]:
    """Each part with its run of `items` (one per branch, in order)."""
    if sum(len(p.branches) for p in parts) != len(items):
        raise ValueError(f"{len(items)} outputs for parts covering {sum(len(p.branches) for p in parts)} branches")
    start = 0
    for part in parts:
        yield part, items[start:start + len(part.branches)]
        start += len(part.branches)
