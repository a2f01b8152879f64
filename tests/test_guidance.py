"""Classifier-free guidance and the time schedule against hand-written formulas (spec §5.4, §7.3).

The reference formulas below are written out per token with Python loops where the spec says
"per token", so they share no code with `pipelines.guidance`.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pipelines.guidance import Branch, branches_for_step, combine
from pipelines.params import ImageParams
from pipelines.schedule import cfg_active, timesteps
from pipelines.step import SamplerStates, StepPart

TOKENS, CHANNELS = 12, 64


@pytest.fixture
def velocities() -> dict[Branch, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    v_c = torch.randn(TOKENS, CHANNELS, generator=g)
    # Unconditional branches differ from v_c so that guidance amplifies the norm (renorm kicks in)
    # on some tokens and not on others.
    v_t = 0.5 * v_c + 0.8 * torch.randn(TOKENS, CHANNELS, generator=g)
    v_i = 0.7 * v_c + 0.5 * torch.randn(TOKENS, CHANNELS, generator=g)
    v_t[:3] = v_c[:3] * 1.01  # near-identical tokens: guided norm below |v_c|, k = 1
    return {Branch.COND: v_c, Branch.CFG_TEXT: v_t, Branch.CFG_IMG: v_i}


def clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def reference_combine(v: dict, g_t: float, g_i: float, kind: str, m: float, with_img: bool) -> torch.Tensor:
    v_c, v_t = v[Branch.COND].double(), v[Branch.CFG_TEXT].double()
    v_i = v[Branch.CFG_IMG].double()
    if g_t <= 1.0:
        return v_c
    a = v_t + g_t * (v_c - v_t)
    if kind == "text_channel":
        rows = []
        for i in range(a.shape[0]):
            k = clamp(float(v_c[i].norm()) / (float(a[i].norm()) + 1e-8), m, 1.0)
            rows.append(k * a[i])
        a = torch.stack(rows)
        return v_i + g_i * (a - v_i) if with_img else a
    d = v_i + g_i * (a - v_i) if with_img else a
    if kind == "global":
        k = clamp(float(v_c.norm()) / (float(d.norm()) + 1e-8), m, 1.0)
        return k * d
    assert kind == "channel"
    return torch.stack([clamp(float(v_c[i].norm()) / (float(d[i].norm()) + 1e-8), m, 1.0) * d[i]
                        for i in range(d.shape[0])])


CASES = [(kind, g_i, m) for kind in ("global", "channel", "text_channel")
         for g_i in (1.0, 1.5, 2.0) for m in (0.0, 0.3)]


@pytest.mark.parametrize("kind,g_i,m", CASES)
def test_combine_matches_formula(kind, g_i, m, velocities):
    params = ImageParams(cfg_text_scale=4.0, cfg_img_scale=g_i, cfg_renorm_type=kind, cfg_renorm_min=m)
    with_img = g_i > 1.0
    v = dict(velocities) if with_img else {b: velocities[b] for b in (Branch.COND, Branch.CFG_TEXT)}
    got = combine(v, params)
    expected = reference_combine(velocities, 4.0, g_i, kind, m, with_img)
    assert got.dtype == torch.float32 and got.shape == (TOKENS, CHANNELS)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_renorm_is_active_in_these_cases(velocities):
    """The cases above exercise both sides of the clamp: some tokens are scaled down, the
    near-identical ones are not."""
    v_c, v_t = velocities[Branch.COND], velocities[Branch.CFG_TEXT]
    a = v_t + 4.0 * (v_c - v_t)
    ratio = v_c.norm(dim=-1) / a.norm(dim=-1)
    assert (ratio[:3] > 1).all() and (ratio[3:] < 1).all()
    plain = v_t + 4.0 * (v_c - v_t)
    renormed = combine({Branch.COND: v_c, Branch.CFG_TEXT: v_t}, ImageParams(cfg_renorm_type="channel"))
    assert torch.allclose(renormed[:3], plain[:3]) and not torch.allclose(renormed[3:], plain[3:])
    # Per token the result never exceeds the conditional norm.
    assert (renormed.norm(dim=-1) <= v_c.norm(dim=-1) * (1 + 1e-5)).all()
    # Globally: the Frobenius norm is capped at |v_c|_F.
    g = combine({Branch.COND: v_c, Branch.CFG_TEXT: v_t}, ImageParams(cfg_renorm_type="global"))
    assert math.isclose(float(g.norm()), float(v_c.norm()), rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("with_img", [False, True])
def test_renorm_min_one_disables_renorm(kind, with_img, velocities):
    g_i = 2.0 if with_img else 1.0
    params = ImageParams(cfg_text_scale=4.0, cfg_img_scale=g_i, cfg_renorm_type=kind, cfg_renorm_min=1.0)
    v_c, v_t, v_i = (velocities[b].double() for b in (Branch.COND, Branch.CFG_TEXT, Branch.CFG_IMG))
    a = v_t + 4.0 * (v_c - v_t)
    expected = v_i + g_i * (a - v_i) if with_img else a
    v = velocities if with_img else {b: velocities[b] for b in (Branch.COND, Branch.CFG_TEXT)}
    torch.testing.assert_close(combine(v, params).double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("g_t", [1.0, 0.999])
@pytest.mark.parametrize("kind", ["global", "text_channel"])
def test_no_text_guidance_means_no_guidance(g_t, kind, velocities):
    # cfg_text_scale <= 1 disables guidance entirely, image guidance included (spec §5.4),
    # even when the unconditional velocities are given.
    params = ImageParams(cfg_text_scale=g_t, cfg_img_scale=3.0, cfg_renorm_type=kind)
    assert torch.equal(combine(velocities, params), velocities[Branch.COND].float())
    assert branches_for_step(1.0, params) == (Branch.COND,)


def test_combine_without_uncond_branch_returns_cond(velocities):
    params = ImageParams(cfg_text_scale=4.0, cfg_img_scale=2.0)
    assert torch.equal(combine({Branch.COND: velocities[Branch.COND]}, params), velocities[Branch.COND])


def test_combine_promotes_to_float32(velocities):
    v = {b: t.to(torch.bfloat16) for b, t in velocities.items()}
    out = combine(v, ImageParams(cfg_img_scale=2.0))
    assert out.dtype == torch.float32


# --------------------------------------------------------------------------- branches / interval

def test_branches_for_step_interval_is_strict_at_the_lower_bound():
    params = ImageParams(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0))
    assert branches_for_step(1.0, params) == (Branch.COND, Branch.CFG_TEXT)
    assert branches_for_step(0.4000001, params) == (Branch.COND, Branch.CFG_TEXT)
    assert branches_for_step(0.4, params) == (Branch.COND,)  # start is excluded
    assert branches_for_step(0.3, params) == (Branch.COND,)
    upper = ImageParams(cfg_interval=(0.0, 0.8))
    assert branches_for_step(0.8, upper) == (Branch.COND, Branch.CFG_TEXT)  # end is included
    assert branches_for_step(0.8000001, upper) == (Branch.COND,)
    assert branches_for_step(0.0, upper) == (Branch.COND,)
    assert cfg_active(1.0, (0.0, 1.0)) and not cfg_active(0.0, (0.0, 1.0))


def test_branches_for_step_image_cfg():
    params = ImageParams(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0))
    assert branches_for_step(0.5, params) == (Branch.COND, Branch.CFG_TEXT, Branch.CFG_IMG)
    assert branches_for_step(0.5, ImageParams(cfg_img_scale=1.0, cfg_interval=(0.0, 1.0))) == \
        (Branch.COND, Branch.CFG_TEXT)
    # Outside the interval nothing but COND runs, whatever the scales.
    assert branches_for_step(0.3, ImageParams(cfg_img_scale=2.0)) == (Branch.COND,)


# --------------------------------------------------------------------------- schedule

SPEC_SCHEDULE = [  # spec §7.3, n = 50, s = 3, 4 decimals
    1.0, 0.9931, 0.986, 0.9787, 0.9712, 0.9635, 0.9556, 0.9474, 0.9389, 0.9302, 0.9213, 0.912, 0.9024,
    0.8926, 0.8824, 0.8718, 0.8609, 0.8496, 0.8378, 0.8257, 0.8131, 0.8, 0.7864, 0.7723, 0.7576,
    0.7423, 0.7263, 0.7097, 0.6923, 0.6742, 0.6552, 0.6353, 0.6145, 0.5926, 0.5696, 0.5455, 0.52,
    0.4932, 0.4648, 0.4348, 0.403, 0.3692, 0.3333, 0.2951, 0.2542, 0.2105, 0.1636, 0.1132, 0.0588,
]


def test_schedule_matches_spec():
    ts = timesteps(50, 3.0)
    assert ts.dtype == torch.float32 and ts.shape == (50,)
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0
    evaluated = ts[:-1]
    assert evaluated.tolist() == pytest.approx(SPEC_SCHEDULE, abs=6e-5)
    assert int((evaluated > 0.4).sum()) == 41  # steps with CFG for interval (0.4, 1]
    params = ImageParams()
    assert sum(len(branches_for_step(float(t), params)) > 1 for t in evaluated) == 41
    assert (ts[:-1] > ts[1:]).all()
    assert math.isclose(float((ts[:-1] - ts[1:]).sum()), 1.0, abs_tol=1e-6)
    assert math.isclose(float(ts[-2] - ts[-1]), 0.0588, abs_tol=1e-4)


def test_schedule_shift_one_is_linear():
    ts = timesteps(50, 1.0)
    torch.testing.assert_close(ts, torch.linspace(1, 0, 50))
    assert int((ts[:-1] > 0.4).sum()) == 30  # spec §7.3: 30 of 49 for s = 1


def test_schedule_fixture_values():
    # The t values of the fixture's 8-step cases (fixture README).
    expected = [1, 0.947368, 0.882353, 0.8, 0.692308, 0.545455, 0.333333]
    assert timesteps(8, 3.0)[:-1].tolist() == pytest.approx(expected, abs=1e-6)


# -- the approximate guidance refresh (cfg_refresh_interval > 1) ----------------------------------

class AnalyticExecutor:
    """Velocities in closed form per (branch, x, t), the image's state kept and each step
    applied by `SamplerStates`, as in the real executors."""

    def __init__(self):
        self.calls: list[tuple[str, ...]] = []
        self.samplers = SamplerStates("cpu")

    @staticmethod
    def velocity(branch: str, x: torch.Tensor, t: float) -> torch.Tensor:
        w = {"cond": 1.0, "cfg_text": 0.6, "cfg_img": 0.8}[branch]
        return torch.sin(w * x + t) + w * x

    def denoise(self, segments, step):
        key = segments[0].context_id
        parts = [StepPart(key, step, step.run, x0=segments[0].latents)]
        segments = self.samplers.fill(parts, segments)
        self.calls.append(tuple(s.context_id for s in segments))
        velocities = [self.velocity(s.context_id, s.latents, s.t) for s in segments]
        return self.samplers.collect(parts, velocities)[key]


def reference_refresh_sampler(x: torch.Tensor, params: ImageParams) -> tuple[torch.Tensor, list[int]]:
    """The approximation written out: guidance branches measured every k-th guided step, else
    v_cond minus the difference measured last time. Returns x and the branches run per step."""
    ts = timesteps(params.num_timesteps, params.timestep_shift)
    x, diff, guided, runs = x.double(), {}, 0, []
    names = ("cfg_text", "cfg_img") if params.cfg_img_scale > 1.0 else ("cfg_text",)
    for i in range(len(ts) - 1):
        t = float(ts[i])
        v = {Branch.COND: AnalyticExecutor.velocity("cond", x, t)}
        if cfg_active(t, params.cfg_interval):
            if guided % params.cfg_refresh_interval == 0:
                for n in names:
                    diff[n] = v[Branch.COND] - AnalyticExecutor.velocity(n, x, t)
                runs.append(1 + len(names))
            else:
                runs.append(1)
            v.update({Branch(n): v[Branch.COND] - diff[n] for n in names})
            v.setdefault(Branch.CFG_IMG, v[Branch.COND])
            guided += 1
            step_v = reference_combine(v, params.cfg_text_scale, params.cfg_img_scale, params.cfg_renorm_type,
                                       params.cfg_renorm_min, len(names) == 2)
        else:
            runs.append(1)
            step_v = v[Branch.COND]
        x = x - step_v * float(ts[i] - ts[i + 1])
    return x, runs


@pytest.mark.parametrize("g_i,kind,k", [(1.0, "global", 2), (2.0, "text_channel", 3), (1.5, "channel", 2)])
def test_refresh_interval_follows_the_written_out_approximation(g_i, kind, k):
    from pipelines.context import Context
    from pipelines.sampler import sample_image

    params = ImageParams(cfg_img_scale=g_i, cfg_renorm_type=kind, num_timesteps=12, cfg_interval=(0.2, 1.0),
                         cfg_refresh_interval=k)
    contexts = {b: Context(b.value, history=(b.value,)) for b in Branch}
    x0 = torch.randn(TOKENS, CHANNELS, generator=torch.Generator().manual_seed(1))
    executor = AnalyticExecutor()
    got = sample_image(executor, contexts, (3, 4), params, x0)
    expected, runs = reference_refresh_sampler(x0, params)
    assert [len(c) for c in executor.calls] == runs
    assert 1 in runs[:5] and max(runs) > 1  # both kinds of guided step happen
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    # ...and it is an approximation: the exact sampler ends elsewhere.
    exact = sample_image(AnalyticExecutor(), contexts, (3, 4), replace(params, cfg_refresh_interval=1), x0)
    assert (exact - got).norm() > 1e-3 * exact.norm()


@pytest.mark.parametrize("value", [0, 11, 1.5, True])
def test_refresh_interval_is_validated(value):
    from bagel_model.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="cfg_refresh_interval"):
        ImageParams(cfg_refresh_interval=value).validate(1024, 16)
