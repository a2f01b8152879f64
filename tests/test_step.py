"""`SamplerStates`, the one owner of the images' sampler state (pipelines/step.py): the same
result however a step's velocities arrive (one forward, one per branch, several images in one
forward), steps that cannot mix, previews, and state that ends with the image."""
from __future__ import annotations

import pickle
from dataclasses import replace

import pytest
import torch

from bagel_model.segments import Segment
from pipelines.guidance import Branch, combine
from pipelines.params import EDIT_DEFAULTS
from pipelines.step import EulerStep, SamplerStates, StepPart

ALL = (Branch.COND, Branch.CFG_TEXT, Branch.CFG_IMG)
TOKENS, CHANNELS = 6, 8


def step(index: int, final: bool = False, run=ALL, **kw) -> EulerStep:
    t = 1.0 - 0.25 * index
    return EulerStep(index=index, t=t, dt=0.25, run=run, same_as_cond=(), params=EDIT_DEFAULTS, final=final, **kw)


def randn(seed: int) -> torch.Tensor:
    return torch.randn(TOKENS, CHANNELS, generator=torch.Generator().manual_seed(seed))


def velocities(seed: int, n: int = 3) -> list[torch.Tensor]:
    return [randn(seed * 10 + i) for i in range(n)]


def test_a_step_is_the_guided_euler_update():
    states, x0, vs = SamplerStates("cpu"), randn(0), velocities(1)
    out = states.collect([StepPart("img", step(0), ALL, x0=x0)], vs)["img"]
    v = combine(dict(zip(ALL, vs)), EDIT_DEFAULTS)
    assert torch.equal(out.v, v) and torch.equal(out.x, x0 - v * 0.25)
    assert out.velocities.keys() == set(ALL)
    assert torch.equal(states.latents("img"), out.x) and states.keys() == ["img"]
    torch.testing.assert_close(states.predicted_clean("img"), x0 - 1.0 * v, rtol=0, atol=0)


def test_branches_in_separate_forwards_give_the_same_step():
    x0, vs = randn(0), velocities(1)
    whole = SamplerStates("cpu").collect([StepPart("img", step(0), ALL, x0=x0)], vs)["img"]
    split = SamplerStates("cpu")
    assert split.collect([StepPart("img", step(0), (Branch.COND,), x0=x0)], vs[:1]) == {}
    assert split.collect([StepPart("img", step(0), (Branch.CFG_IMG,))], vs[2:]) == {}  # any order
    out = split.collect([StepPart("img", step(0), (Branch.CFG_TEXT,))], vs[1:2])["img"]
    assert torch.equal(out.x, whole.x) and torch.equal(out.v, whole.v)


def test_several_images_in_one_forward():
    """A batched forward: each image's step applied from its share of the outputs."""
    one_by_one, batched = SamplerStates("cpu"), SamplerStates("cpu")
    expected = {}
    for key, seed in (("a", 1), ("b", 2)):
        expected[key] = one_by_one.collect([StepPart(key, step(0), ALL, x0=randn(seed))], velocities(seed))[key]
    parts = [StepPart("a", step(0), ALL, x0=randn(1)), StepPart("b", step(0), (Branch.COND,), x0=randn(2))]
    done = batched.collect(parts, velocities(1) + velocities(2)[:1])
    assert list(done) == ["a"] and torch.equal(done["a"].x, expected["a"].x)
    done = batched.collect([StepPart("b", step(0), ALL[1:])], velocities(2)[1:])
    assert torch.equal(done["b"].x, expected["b"].x)
    with pytest.raises(ValueError, match="4 outputs for parts covering 3 branches"):
        batched.collect([StepPart("a", step(1), ALL)], velocities(3, n=4))


def test_velocities_of_different_steps_never_mix():
    states = SamplerStates("cpu")
    states.collect([StepPart("img", step(0), (Branch.COND,), x0=randn(0))], velocities(1, n=1))
    with pytest.raises(ValueError, match="at step 0: velocities of step 1 cannot join it"):
        states.collect([StepPart("img", step(1), (Branch.CFG_TEXT,))], velocities(2, n=1))
    with pytest.raises(ValueError, match=r"repeated branches \[<Branch.COND"):
        states.collect([StepPart("img", step(0), (Branch.COND,))], velocities(2, n=1))
    with pytest.raises(ValueError, match="unexpected"):
        states.collect([StepPart("img", step(0, run=(Branch.COND, Branch.CFG_TEXT)), (Branch.CFG_IMG,))],
                       velocities(2, n=1))
    with pytest.raises(ValueError, match="already being sampled"):
        states.collect([StepPart("img", step(0), (Branch.CFG_TEXT,), x0=randn(0))], velocities(2, n=1))


def test_state_ends_with_the_final_step_or_free():
    states = SamplerStates("cpu")
    states.collect([StepPart("a", step(0), ALL, x0=randn(0))], velocities(1))
    out = states.collect([StepPart("a", step(1, final=True), ALL)], velocities(2))["a"]
    assert out.x.dtype == torch.float32 and states.keys() == []
    with pytest.raises(KeyError, match="no sampler state for image 'a'"):
        states.latents("a")
    states.collect([StepPart("b", step(0), (Branch.COND,), x0=randn(0))], velocities(1, n=1))
    states.free(["b", "unknown"])
    assert states.keys() == []


def test_refresh_differences_persist_between_steps():
    """APPROXIMATE refresh: a step that skips CFG_TEXT estimates it as v_cond - (difference
    measured when it last ran)."""
    params = replace(EDIT_DEFAULTS, cfg_img_scale=1.0, cfg_refresh_interval=2)
    run2 = (Branch.COND, Branch.CFG_TEXT)
    first = EulerStep(0, 1.0, 0.25, run2, (), params, False)
    second = EulerStep(1, 0.75, 0.25, (Branch.COND,), (), params, True, estimated=(Branch.CFG_TEXT,))
    states = SamplerStates("cpu")
    v0 = velocities(1, n=2)
    x1 = states.collect([StepPart("img", first, run2, x0=randn(0))], v0)["img"].x
    v_cond = randn(7)
    out = states.collect([StepPart("img", second, (Branch.COND,))], [v_cond])["img"]
    estimated = v_cond - (v0[0] - v0[1])
    assert torch.equal(out.velocities[Branch.CFG_TEXT], estimated)
    assert torch.equal(out.x, x1 - combine({Branch.COND: v_cond, Branch.CFG_TEXT: estimated}, params) * 0.25)


def test_fill_gives_noise_segments_their_images_latents():
    states = SamplerStates("cpu")
    states.collect([StepPart("a", step(0), (Branch.COND,), x0=randn(0))], velocities(1, n=1))
    given = randn(5)
    segments = [Segment.noise("a", None, (2, 3), 0.5, 4), Segment.noise("b", given, (2, 3), 0.5, 4)]
    parts = [StepPart("a", step(1), (Branch.COND,)), StepPart("b", step(0), (Branch.COND,))]
    filled = states.fill(parts, segments)
    assert filled[0].latents is states.latents("a") and filled[1].latents is given


def test_step_messages_pickle():
    """They travel to Ray actors."""
    part = StepPart("img", step(3, final=True), ALL, x0=randn(0))
    back = pickle.loads(pickle.dumps(part))
    assert back.step == part.step and back.branches == ALL and torch.equal(back.x0, part.x0)
