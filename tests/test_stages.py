"""Pipeline stages do not change results: a LocalExecutor over 1, 2 or 3 stages of the same
4-layer demo checkpoint (float32, CPU) gives bit-identical outputs (`torch.equal`, token ids
equal) for text-to-image, editing, understanding with an image and think-mode generation, and
frees every context after each task.

Splitting only changes where the layer loop is cut; each layer sees the same inputs and runs the
same kernels, so equality is exact, not approximate.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_model.demo import demo_config, demo_tokenizer, write_checkpoint
from bagel_model.segments import Segment
from pipelines.local import LocalExecutor
from pipelines.guidance import Branch
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS, ImageParams, TextParams
from pipelines.tasks import generate_image, understand

NUM_LAYERS = 4
STAGE_COUNTS = (1, 2, 3)
T2I = ImageParams(num_timesteps=4, height=64, width=64)  # CFG on (g_T 4), 3 evaluations


@pytest.fixture(scope="module")
def executors(tmp_path_factory) -> dict[int, LocalExecutor]:
    tok = demo_tokenizer()
    folder: Path = write_checkpoint(tmp_path_factory.mktemp("demo4"),
                                    demo_config(num_layers=NUM_LAYERS, vocab_size=len(tok)), tok)
    out = {n: LocalExecutor.from_checkpoint(folder, num_stages=n, dtype=torch.float32) for n in STAGE_COUNTS}
    # The split is what we think it is.
    assert [[list(s.stage.layers) for s in out[n].stages] for n in STAGE_COUNTS] == \
        [[[0, 1, 2, 3]], [[0, 1], [2, 3]], [[0, 1], [2], [3]]]
    return out


def gradient(width: int = 160, height: int = 128) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)),
                    np.broadcast_to(255 - (x + y) / 2, (height, width))], axis=-1)
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def run_all(executors, task) -> dict[int, object]:
    results = {}
    for n, executor in executors.items():
        results[n] = task(executor)
        assert executor.live_contexts() == [], f"{n} stages: contexts leaked"
    return results


def assert_images_equal(results) -> None:
    base = results[1]
    for n in STAGE_COUNTS[1:]:
        assert torch.equal(results[n].latent, base.latent), f"{n} stages: final latent differs"
        assert np.array_equal(np.asarray(results[n].image), np.asarray(base.image)), f"{n} stages: image differs"
    # Not a degenerate output: the latent moved away from the noise and the image is not flat.
    assert base.latent.abs().max() > 0.1
    assert np.asarray(base.image).std() > 1.0


def test_text_to_image(executors):
    steps = {n: [] for n in STAGE_COUNTS}

    def task(executor):
        n = len(executor.stages)
        return generate_image(executor, ["A red fox in the snow."], T2I, noise=NoiseSource(seed=0),
                              on_step=steps[n].append)
    results = run_all(executors, task)
    assert_images_equal(results)
    assert results[1].image.size == (64, 64)
    assert results[1].latent.shape == (16, executors[1].config.patch_latent_dim)
    for n in STAGE_COUNTS[1:]:
        assert len(steps[n]) == len(steps[1]) == T2I.num_timesteps - 1
        for a, b in zip(steps[n], steps[1], strict=True):
            assert a.velocities.keys() == b.velocities.keys()
            assert all(torch.equal(a.velocities[k], b.velocities[k]) for k in a.velocities)
            assert torch.equal(a.v, b.v)


def test_edit(executors):
    image = gradient()
    params = replace(EDIT_DEFAULTS, num_timesteps=4)

    steps = {n: [] for n in STAGE_COUNTS}

    def task(executor):
        return generate_image(executor, [image, "Make it purple."], params, noise=NoiseSource(seed=1),
                              on_step=steps[len(executor.stages)].append)
    results = run_all(executors, task)
    assert_images_equal(results)
    assert set(steps[1][0].velocities) == {Branch.COND, Branch.CFG_TEXT, Branch.CFG_IMG}
    for n in STAGE_COUNTS[1:]:
        for a, b in zip(steps[n], steps[1], strict=True):
            assert all(torch.equal(a.velocities[k], b.velocities[k]) for k in b.velocities)
    # The output takes the VAE-resized input size (160x128 -> short side 128).
    assert results[1].image.size == executors[1].config.vae_transform.target_size(*image.size)


def test_understand_with_image(executors):
    image = gradient(140, 100)

    def task(executor):
        return understand(executor, [image, "What is in this picture?"], TextParams(max_new_tokens=12))
    results = run_all(executors, task)
    base = results[1]
    assert len(base.token_ids) > 0
    for n in STAGE_COUNTS[1:]:
        assert results[n].token_ids == base.token_ids, f"{n} stages"
        assert results[n].text == base.text


def test_understand_logits_equal(executors):
    """The decode logits themselves are bit-identical, not merely their argmax."""
    logits = {}
    for n, executor in executors.items():
        tok = executor.tokenizer
        ids = [tok.bos_id, *tok.encode("Hello there"), tok.eos_id, tok.bos_id]
        try:
            logits[n] = executor.decode([Segment.text("stages/probe", ids, 0, want_logits=True)])[0]
        finally:
            executor.free(["stages/probe"])
        assert executor.live_contexts() == []
    for n in STAGE_COUNTS[1:]:
        assert torch.equal(logits[n], logits[1]), f"{n} stages"


def test_think_generation(executors):
    params = ImageParams(num_timesteps=3, height=48, width=80)

    def task(executor):
        return generate_image(executor, ["a car made of small cars"], params, think=True,
                              text_params=TextParams(max_new_tokens=10), noise=NoiseSource(seed=2))
    results = run_all(executors, task)
    assert_images_equal(results)
    assert results[1].image.size == (80, 48)
    base = results[1].thought
    assert base is not None and len(base.token_ids) > 0
    for n in STAGE_COUNTS[1:]:
        assert results[n].thought.token_ids == base.token_ids
        assert results[n].thought.text == base.text
