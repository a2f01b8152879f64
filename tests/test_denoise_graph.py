"""Denoising graphs (bagel_model/denoise_graph.py): the bookkeeping around captured forwards.

On the CPU there are no CUDA graphs, so `Recorder` stands in for the capture: it runs the
function once, and every replay runs it again into the same output tensors, the way a replayed
graph rewrites its static outputs from its static input. That checks what the bookkeeping
must get right: static input copied in, outputs cloned out, graphs recaptured when a context's
cache changed, forgotten when contexts are freed, at most `max_graphs` kept. The GPU replay
itself is checked against the eager forward by bench/check_fastpaths.py.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from bagel_model.denoise_graph import DenoiseGraphs
from bagel_model.segments import Segment
from pipelines.local import LocalExecutor
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS, ImageParams
from pipelines.tasks import generate_image


class Recorder:
    def __init__(self):
        self.captures = self.replays = 0
        self.pools = set()

    def __call__(self, fn, pool):
        self.captures += 1
        self.pools.add(pool)
        out = fn()

        def replay():
            self.replays += 1
            new = fn()
            for o, n in zip(*(([out], [new]) if isinstance(out, torch.Tensor) else (out, new))):
                o.copy_(n)
        return replay, out


@pytest.fixture(scope="module")
def pair(checkpoint_dir):
    """(with graphs, plain) executors on the same float32 weights, two stages each."""
    base = LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32, num_stages=2)
    parts = (base.config, base.tokenizer, base.stages, base.vision, base.vae)
    graphed, plain = LocalExecutor(*parts), LocalExecutor(*parts, graphs=False)
    recorder = Recorder()
    for runner in graphed.runners:
        runner.denoise_graphs = DenoiseGraphs(runner._forward, runner.cache, runner.device,
                                              capture=recorder, new_pool=object)
    return graphed, plain, recorder


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_generation_with_graphs_equals_plain(pair, task):
    graphed, plain, recorder = pair
    if task == "t2i":
        items, params = ["a red fox in the snow"], ImageParams(num_timesteps=8, height=64, width=64)
    else:
        image = Image.fromarray((torch.arange(48 * 64 * 3) % 251).to(torch.uint8).reshape(48, 64, 3).numpy())
        items, params = [image, "make it night"], replace(EDIT_DEFAULTS, num_timesteps=6)
    before, pools = recorder.replays, len(recorder.pools)
    a = generate_image(graphed, items, params, noise=NoiseSource(3))
    b = generate_image(plain, items, params, noise=NoiseSource(3))
    assert torch.equal(a.latent, b.latent)
    # t2i: 7 steps, 5 guided (2 branches) then 2 unguided (1 branch): each kind runs eagerly once,
    # is captured on its second step, replayed from then on; per stage.
    expected = {"t2i": (5 - 1) + (2 - 1), "edit": 5 - 1}[task]  # edit: 5 steps, all guided
    assert recorder.replays - before == expected * len(graphed.runners)
    # a request's graphs share one pool per stage; freed with them, never captured into again
    assert len(recorder.pools) - pools == len(graphed.runners)
    assert graphed.live_contexts() == []
    for runner in graphed.runners:
        assert len(runner.denoise_graphs) == 0 and not runner.denoise_graphs._seen


def test_recapture_after_cache_change_and_graph_limit(checkpoint_dir):
    base = LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32)
    runner, recorder = base.runners[0], Recorder()
    graphs = runner.denoise_graphs = DenoiseGraphs(runner._forward, runner.cache, runner.device, max_graphs=2,
                                                   capture=recorder, new_pool=object)
    plain = LocalExecutor(base.config, base.tokenizer, base.stages, base.vision, base.vae, graphs=False).runners[0]
    plain.cache = runner.cache  # same contexts, no graphs
    runner.run([Segment.text("c", [1, 2, 3, 4, 5], 0)])
    x = torch.randn(16, base.config.patch_latent_dim)
    noise = [Segment.noise("c", x, (4, 4), 0.5, 5)]
    eager = runner.run(noise)  # first sight: eager
    replayed = runner.run(noise)  # captured, replayed
    assert recorder.captures == 1 and recorder.replays == 1
    torch.testing.assert_close(replayed[0], eager[0], rtol=0, atol=0)
    with torch.inference_mode():
        replayed[0].zero_()  # the caller owns what it gets: the graph's outputs are untouched
    torch.testing.assert_close(runner.run(noise)[0], eager[0], rtol=0, atol=0)

    runner.cache.free(["c"])  # same context, same length, new K/V tensors: not the graph's
    runner.run([Segment.text("c", [5, 4, 3, 2, 1], 0)])
    fresh = plain.run(noise)
    assert not torch.equal(fresh[0], eager[0])
    torch.testing.assert_close(runner.run(noise)[0], fresh[0], rtol=0, atol=0)  # eager again
    torch.testing.assert_close(runner.run(noise)[0], fresh[0], rtol=0, atol=0)  # recaptured
    assert recorder.captures == 2

    runner.free(["c"])
    captures = recorder.captures
    for i in range(3):  # more keys than max_graphs: the third runs eagerly, nothing is evicted
        runner.run([Segment.text(f"o{i}", [1, 2], 0)])
        call = [Segment.noise(f"o{i}", x, (4, 4), 0.5, 2)]
        for _ in range(3):
            torch.testing.assert_close(runner.run(call)[0], plain.run(call)[0], rtol=0, atol=0)
    assert len(graphs) == 2 and recorder.captures == captures + 2
    runner.free(["o0", "o1", "o2"])
    assert len(graphs) == 0 and not graphs._seen
