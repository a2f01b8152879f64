"""Previews of an image in the making (pipelines/previews.py, bagel_model/latent_rgb.py) on the
fixture model in this process: which steps they follow, that they are the sampler's predicted
clean latents (x_t - t * v) and change nothing in the result, that both decoders give pictures,
and that the renderer hands them over in order, off the sampling thread."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bagel_model.latent_rgb import fit_latent_rgb, latent_rgb
from bagel_model.latents import to_uint8, unpatchify
from pipelines.noise import NoiseSource
from pipelines.params import ImageParams
from pipelines.previews import Preview, PreviewRenderer, preview_steps, render_preview
from pipelines.tasks import generate_image

PARAMS = ImageParams(num_timesteps=8, height=64, width=64)  # 7 steps


@pytest.mark.parametrize("num_steps,count,expected", [
    (49, 3, [12, 24, 36]), (49, 1, [24]), (49, 0, []), (7, 3, [1, 3, 5]), (3, 3, [0, 1]), (2, 2, [0]), (1, 3, []),
])
def test_preview_steps_are_spread_and_never_the_last(num_steps, count, expected):
    assert preview_steps(num_steps, count) == expected


def run(executor, previews: int = 0):
    steps, got = [], []
    result = generate_image(executor, ["A red fox in the snow."], PARAMS, noise=NoiseSource(3), on_step=steps.append,
                            previews=previews, on_preview=got.append if previews else None)
    return result, steps, got


def test_previews_are_the_predicted_clean_latents_and_change_nothing(executor):
    plain, _, _ = run(executor)
    result, steps, previews = run(executor, previews=3)
    assert torch.equal(result.latent, plain.latent)  # bit for bit
    assert [(p.index, p.step, p.num_steps, p.width, p.height) for p in previews] == [
        (0, 2, 7, 64, 64), (1, 4, 7, 64, 64), (2, 6, 7, 64, 64)]
    cfg = executor.config
    grid = (64 // cfg.latent_downsample,) * 2
    xs = [None] + [s.x for s in steps]  # latents after each step (the first step's input is the noise)
    for preview in previews:
        progress = steps[preview.step - 1]
        expected = xs[preview.step - 1] - progress.t * progress.v
        got = preview.latent()
        assert got.shape == (1, cfg.latent_channels, 64 // cfg.vae.downsample, 64 // cfg.vae.downsample)
        torch.testing.assert_close(got, unpatchify(expected.float().cpu(), *grid, p=cfg.latent_patch_size,
                                                   channels=cfg.latent_channels))
    # Later predictions are closer to the final latents.
    final = unpatchify(result.latent, *grid, p=cfg.latent_patch_size, channels=cfg.latent_channels)
    distances = [float((p.latent() - final).norm()) for p in previews]
    assert distances == sorted(distances, reverse=True) and distances[-1] < 0.7 * distances[0], distances
    assert executor.live_contexts() == []


def test_both_decoders_give_pictures(executor):
    _, _, previews = run(executor, previews=1)
    latent = previews[0].latent()
    linear = render_preview(executor, latent, "linear")
    vae = render_preview(executor, latent, "vae")
    assert linear.size == (64 // executor.config.vae.downsample,) * 2 and linear.mode == "RGB"
    assert vae.size == (64, 64) and vae.mode == "RGB"
    assert np.asarray(vae).std() > 1 and np.asarray(linear).std() > 1
    assert np.array_equal(np.asarray(vae), to_uint8(executor.decode_latents(latent)).numpy())
    with pytest.raises(ValueError, match="preview decoder"):
        render_preview(executor, latent, "jpeg")


def test_linear_map_predicts_patch_colours(executor):
    """On smooth colour fields it has not seen, the fitted map is closer to each 8x8 patch's mean
    colour than that image's overall mean colour is (the fixture's VAE has random weights, so
    the fit is looser than on FLUX's)."""
    vae = executor.vae
    weights = executor.latent_rgb_map()
    assert weights.shape == (vae.cfg.z_channels + 1, 3) and executor.latent_rgb_map() is weights  # fitted once
    assert torch.equal(weights, fit_latent_rgb(vae))  # deterministic
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        image = F.interpolate(torch.rand(1, 3, 3, 3, generator=generator) * 2 - 1, size=(128, 128), mode="bilinear")
        target = to_uint8(F.avg_pool2d(image, 8)).float()
        predicted = latent_rgb(vae.encode_mean(image), weights).float()
        baseline = target.mean(dim=(0, 1), keepdim=True)
        assert (predicted - target).abs().mean() < 0.9 * (baseline - target).abs().mean()
    with pytest.raises(ValueError, match="latent"):
        latent_rgb(torch.zeros(1, 4, 2, 2), weights)


class SlowFirst:
    """An executor whose first preview decode is slow."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def latent_rgb_map(self):
        self.calls += 1
        if self.calls == 1:
            time.sleep(0.3)
        return self.inner.latent_rgb_map()


def test_renderer_hands_previews_over_in_order_off_the_caller_thread(executor):
    _, _, previews = run(executor, previews=3)
    got, threads = [], set()

    def on_image(preview: Preview, image) -> None:
        got.append(preview.index)
        threads.add(threading.get_ident())

    with ThreadPoolExecutor(3) as pool:
        renderer = PreviewRenderer(SlowFirst(executor), "linear", pool, on_image)
        start = time.perf_counter()
        for p in previews:
            renderer(p)
        assert time.perf_counter() - start < 0.2  # handing a preview over does not wait for it
        renderer.wait()
    assert got == [0, 1, 2]
    assert threading.get_ident() not in threads


def test_renderer_cancel_and_failures(executor):
    _, _, previews = run(executor, previews=2)
    got = []
    with ThreadPoolExecutor(2) as pool:
        renderer = PreviewRenderer(SlowFirst(executor), "linear", pool, lambda p, image: got.append(p.index))
        for p in previews:
            renderer(p)
        renderer.cancel()
        renderer.wait()
        assert got == []  # the first was being decoded: it is dropped, the second never starts

        def fail(preview, image):
            raise RuntimeError("client gone")

        renderer = PreviewRenderer(executor, "vae", pool, fail)
        renderer(previews[0])
        with pytest.raises(RuntimeError, match="client gone"):
            renderer.wait()
    with pytest.raises(ValueError, match="preview decoder"):
        PreviewRenderer(executor, "nearest", pool, fail)
