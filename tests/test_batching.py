"""Step-level batching across requests (pipelines/batching.py) in process, fp32 CPU on the fixture.

Exactness: each request's latents equal those it gets alone within 1e-6 of their largest
magnitude. Not bit for bit: alone, an image's two marker rows are the only rows of the
understanding expert's GEMMs, and MKL computes a GEMM of <= 4 rows with other kernels (another
summation order) than a taller one; every other row is bit for bit (README, Step batching).
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from bagel_model.segments import Segment
from cluster.executor import ClusterExecutor
from pipelines.batching import StepBatcher, StepCall
from pipelines.guidance import Branch
from pipelines.local import LocalExecutor
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS, ImageParams
from pipelines.step import EulerStep, StepOutput
from pipelines.tasks import generate_image

from .service_app import data_url, max_pixel_diff, running_app



def _requests(fixture_dir: Path) -> list[dict]:
    """t2i and edit with different seeds, sizes and step counts."""
    image = Image.open(fixture_dir / "inputs" / "input_gradient.png")
    return [
        dict(items=["a red fox"], params=ImageParams(height=128, width=128, num_timesteps=8), seed=1),
        dict(items=[image, "make it night"], params=replace(EDIT_DEFAULTS, height=64, width=96, num_timesteps=6),
             seed=2),
        dict(items=["a blue bird at dawn"], params=ImageParams(height=64, width=64, num_timesteps=10), seed=3),
    ]


def _generate(executor: LocalExecutor, request: dict, on_step=None) -> torch.Tensor:
    return generate_image(executor, request["items"], request["params"], noise=NoiseSource(request["seed"]),
                          on_step=on_step).latent


@pytest.fixture(scope="module")
def batched(checkpoint_dir: Path) -> tuple[LocalExecutor, Counter]:
    sizes: Counter = Counter()
    executor = LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32, batch_wait_s=0.2,
                                             on_forward=lambda n: sizes.update([n]))
    return executor, sizes


def test_concurrent_requests_joining_at_different_steps_equal_each_alone(executor, batched, fixture_dir):
    requests = _requests(fixture_dir)
    alone = [_generate(executor, r) for r in requests]  # the session executor: batches of one

    batching, sizes = batched
    sizes.clear()
    reached, started = ([threading.Event() for _ in requests] for _ in range(2))
    results: list[torch.Tensor | None] = [None] * len(requests)

    def run(i: int) -> None:
        def on_step(progress) -> None:
            started[i].set()
            if progress.step == 2:  # the next request joins at this one's third step
                reached[i].set()
                if i + 1 < len(requests):
                    assert started[i + 1].wait(60)
        results[i] = _generate(batching, requests[i], on_step)

    threads = []
    for i in range(len(requests)):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
        assert reached[i].wait(60)
    for t in threads:
        t.join(60)
    for got, want in zip(results, alone):
        assert got is not None
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
    assert max(sizes) == 3, sizes  # all three shared forwards
    assert batching.live_contexts() == [] and batching.batcher.live() == []


def test_a_request_failing_mid_way_leaves_the_others_exact_and_nothing_behind(executor, batched, fixture_dir):
    requests = _requests(fixture_dir)[::2]
    alone = _generate(executor, requests[1])
    batching, sizes = batched
    sizes.clear()
    both_running = threading.Barrier(2, timeout=60)
    results: list = [None, None]

    def run(i: int) -> None:
        def on_step(progress) -> None:
            if progress.step == 1:
                both_running.wait()
            if i == 0 and progress.step == 3:
                raise RuntimeError("client went away")
        try:
            results[i] = _generate(batching, requests[i], on_step)
        except RuntimeError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(results[0], RuntimeError)
    torch.testing.assert_close(results[1], alone, rtol=0, atol=1e-6 * float(alone.abs().max()))
    assert sizes[2] >= 2  # they shared forwards before the first one stopped
    assert batching.live_contexts() == [] and batching.batcher.live() == []


class _Recorder:
    """A `RunBatch` that records the batches it ran and answers each call with its step index."""

    def __init__(self, fail: str | None = None):
        self.batches: list[list[str]] = []
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, calls: list[StepCall]) -> list:
        self.batches.append([c.key for c in calls])
        self.gate.wait(10)
        return [ValueError(c.key) if c.key == self.fail else StepOutput(v=torch.tensor(c.step.index))
                for c in calls]


def _call(key: str, tokens: int, index: int = 0, final: bool = False) -> tuple[list[Segment], EulerStep]:
    side = int((tokens - 2) ** 0.5)
    segment = Segment.noise(key, None, (side, side), 1.0, 0)
    return [segment], EulerStep(index, 1.0, 0.1, (Branch.COND,), (), ImageParams(), final)


def _concurrently(batcher: StepBatcher, calls: list[tuple[list[Segment], EulerStep]], recorder: _Recorder) -> list:
    """Submit the calls in order while the batcher's first forward is held, then let it go."""
    recorder.gate.clear()
    out: list = [None] * len(calls)

    def run(i):
        try:
            out[i] = batcher.denoise(*calls[i])
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for i, t in enumerate(threads):
        t.start()
        while len(batcher._queue) + sum(len(b) for b in recorder.batches) < i + 1:
            time.sleep(0.01)  # each call queued before the next
    recorder.gate.set()
    for t in threads:
        t.join(10)
    return out


def test_token_cap_and_first_come_first_served():
    recorder = _Recorder()
    batcher = StepBatcher(recorder, max_batch_tokens=300, batch_wait_s=0.0)
    # 102, 258, 102 and 102 tokens: the first forward runs alone (it started before the others
    # queued), then "b" (258) fits with nothing, then "c" and "d" together: never "c" before "b".
    calls = [_call("a", 102), _call("b", 258), _call("c", 102), _call("d", 102)]
    out = _concurrently(batcher, calls, recorder)
    assert all(isinstance(o, StepOutput) for o in out)
    assert recorder.batches == [["a"], ["b"], ["c", "d"]]
    big = _call("e", 402)  # over the cap alone: runs alone
    assert isinstance(batcher.denoise(*big), StepOutput) and recorder.batches[-1] == ["e"]


def test_an_error_fails_only_its_request_and_leaves_nothing_live():
    recorder = _Recorder(fail="b")
    batcher = StepBatcher(recorder, max_batch_tokens=10_000, batch_wait_s=0.0)
    out = _concurrently(batcher, [_call("a", 102), _call("b", 102), _call("c", 102)], recorder)
    assert isinstance(out[1], ValueError) and str(out[1]) == "b"
    assert isinstance(out[0], StepOutput) and isinstance(out[2], StepOutput)
    assert recorder.batches == [["a"], ["b", "c"]]
    assert batcher.live() == ["a", "c"]  # mid-sampling; "b" left
    batcher.forget(["a", "c"])
    assert batcher.live() == []


def test_an_image_alone_never_waits_for_the_batch_window():
    recorder = _Recorder()
    batcher = StepBatcher(recorder, max_batch_tokens=10_000, batch_wait_s=30.0)
    for i in range(3):
        assert batcher.denoise(*_call("a", 102, index=i, final=i == 2)).v == i
    assert batcher.live() == []


def test_the_window_is_not_waited_for_an_image_that_could_not_fit():
    """A live image whose next step cannot fit beside the queued ones is not waited for; one
    that could fit is, up to the window."""
    recorder = _Recorder()
    batcher = StepBatcher(recorder, max_batch_tokens=300, batch_wait_s=5.0)
    batcher.denoise(*_call("big", 258))  # live, not final: its next step (~258 tokens) is missing
    t = time.monotonic()
    batcher.denoise(*_call("small", 102))  # 102 + 258 > 300: "big" could not join, no wait
    assert time.monotonic() - t < 1.0
    batcher.forget(["big", "small"])
    roomy = StepBatcher(recorder, max_batch_tokens=1000, batch_wait_s=0.3)
    roomy.denoise(*_call("big", 258))
    t = time.monotonic()
    roomy.denoise(*_call("small", 102))  # "big" could join: the window is waited for
    assert time.monotonic() - t >= 0.3


def test_a_failing_forward_listener_neither_hangs_nor_fails_the_steps():
    def broken(n: int) -> None:
        raise RuntimeError("metrics down")

    batcher = StepBatcher(_Recorder(), max_batch_tokens=1000, batch_wait_s=0.0, on_forward=broken)
    for i in range(2):  # the second call would hang if the first forward had left the batcher running
        assert batcher.denoise(*_call("a", 102, index=i, final=i == 1)).v == i


class _Stages:
    """`StageGroup`'s submission interface, recording the calls (1 stage per branch group)."""

    def __init__(self, num_groups: int):
        self.num_stages, self.num_groups, self.log = 1, num_groups, []

    def rank(self, group: int, stage: int) -> int:
        return group

    @contextlib.contextmanager
    def ordered(self):
        yield self

    def share(self, owner, key, firsts):
        self.log.append(("share", owner, key, firsts))
        return f"share {key}"

    def chain(self, group, segments, parts, latents, owners):
        self.log.append(("chain", group, [s.context_id for s in segments], [(p.key, p.branches) for p in parts],
                         latents, owners))
        return f"chain {group}"

    def gather(self, owner, parts, chains):
        self.log.append(("gather", owner, [[p.key for p in ps] for ps in parts], chains))
        return f"gather {owner}"

    def wait(self, calls):
        return [None] * len(calls)


def test_cluster_batches_share_micro_batches_per_branch_group_and_keep_each_state_owner():
    """Two guided images based on different branch groups (1 stage each): one micro-batch per
    group carries one's COND and the other's text-free branch; each owner gathers the branch
    computed on the other group, and gets its latents shared there."""
    stages = _Stages(num_groups=2)
    executor = ClusterExecutor(None, None, stages, None, None)
    guided = EulerStep(1, 0.9, 0.1, (Branch.COND, Branch.CFG_TEXT), (), ImageParams(), False)
    calls = [StepCall([Segment.noise(f"{r}/{b.value}{i}", None, (2, 2), 0.9, 5) for i, b in enumerate(guided.run)],
                      guided) for r in ("a", "b")]
    assert [executor._place(c.key) for c in calls] == [0, 1]
    assert executor._denoise_batch(calls) == [StepOutput(), StepOutput()]
    cond, text = (Branch.COND,), (Branch.CFG_TEXT,)
    assert stages.log == [
        ("share", 0, "a/cond0", [1]), ("share", 1, "b/cond0", [0]),
        ("chain", 0, ["a/cond0", "b/cfg_text1"], [("a/cond0", cond), ("b/cond0", text)], [None, "share b/cond0"],
         [None, 1]),
        ("chain", 1, ["a/cfg_text1", "b/cond0"], [("a/cond0", text), ("b/cond0", cond)], ["share a/cond0", None],
         [0, None]),
        ("gather", 1, [["b/cond0"]], ["chain 0"]), ("gather", 0, [["a/cond0"]], ["chain 1"])]


# -- the Serve app: 2 stages x 2 branch groups on CPU (gloo) ---------------------------------------

SERVE_REQUESTS = [
    ("/v1/images/generations", {"prompt": "a red fox", "size": "64x64", "num_timesteps": 8, "seed": 1}),
    ("/v1/images/generations", {"prompt": "a blue bird at dawn", "size": "96x64", "num_timesteps": 6, "seed": 3}),
    ("/v1/images/edits", {"prompt": "make it night", "num_timesteps": 6, "seed": 2}),
]


def test_serve_batches_concurrent_requests_on_stages_and_branch_groups(ray_url, executor, fixture_dir):
    """Concurrent HTTP requests on topology 1x2x2 share forwards (the metric says so) and each
    image equals the in-process pipeline's alone (within one pixel level, as every topology)."""
    png = (fixture_dir / "inputs" / "input_gradient.png").read_bytes()
    image = Image.open(fixture_dir / "inputs" / "input_gradient.png")
    expected = []
    for route, body in SERVE_REQUESTS:
        size = tuple(int(v) for v in body["size"].split("x")) if "size" in body else (None, None)
        params = replace(EDIT_DEFAULTS if "edits" in route else ImageParams(), width=size[0], height=size[1],
                         num_timesteps=body["num_timesteps"])
        items = [image, body["prompt"]] if "edits" in route else [body["prompt"]]
        expected.append(generate_image(executor, items, params, noise=NoiseSource(body["seed"])).image)
    args = {"checkpoint_dir": str(fixture_dir / "checkpoint"), "device": "cpu", "dtype": "float32",
            "cfg_parallel": 2, "num_stages": 2, "batch_wait_s": 0.5}
    with running_app(ray_url, args), httpx.Client(base_url=ray_url, timeout=120) as client:
        responses: list = [None] * len(SERVE_REQUESTS)

        def post(i: int) -> None:
            route, body = SERVE_REQUESTS[i]
            responses[i] = client.post(route, json={**body, "image": data_url(png)} if "edits" in route else body)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(SERVE_REQUESTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for r, want in zip(responses, expected):
            assert r is not None and r.status_code == 200, r and r.text
            assert max_pixel_diff(r.json()["data"][0]["b64_json"], want) <= 1
        metrics = client.get("/metrics").text
        health = client.get("/health").json()
    alone, forwards = (_metric(metrics, f"bagel_requests_per_forward_{name}") for name in ('bucket{le="1.0"', "count"))
    assert forwards > alone, metrics  # some forwards carried several requests' steps
    assert all(s["live_contexts"] == 0 and not s["latent_states"] for s in health["stages"])


def _metric(text: str, prefix: str) -> float:
    [value] = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)]
    return value
