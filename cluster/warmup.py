"""Warm-up: the requests a replica runs on fresh stage workers before it says it is ready.

On an H200 the first text-to-image on fresh workers took 25 s against 9.7 s later: compiling
the fused kernels (torch.compile: static shapes first, dynamic once a second shape is seen),
choosing cuBLAS / cuDNN algorithms, making the CUDA-graph memory pools, the decoder's and
encoder's first convolutions at the size. So at each configured size every configured task runs
once, through the same executor as requests: text-to-image twice with prompts of different
lengths (so the kernels see a second shape), an edit, and an answer about an image (decode-step
graphs). Enough timesteps to capture a denoising graph and to run steps inside and outside the
guidance interval.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from bagel_model.config import BagelConfig
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS, ImageParams, TextParams, with_overrides
from pipelines.tasks import generate_image, understand

from .args import Warmup

log = logging.getLogger("ray.serve")

PROMPTS = ("a red fox in the snow", "an old stone lighthouse on a cliff above a stormy sea at dusk, oil painting")


def warmup_sizes(warmup: Warmup, config: BagelConfig, uses_cuda: bool) -> list[tuple[int, int]]:
    """(width, height) to warm up: the configured sizes, else the model's default on GPUs."""
    if warmup.sizes is None:
        return [(config.max_image_side, config.max_image_side)] if uses_cuda else []
    return [tuple(int(v) for v in size.lower().split("x")) for size in warmup.sizes]


def warm_up(executor, warmup: Warmup, sizes: list[tuple[int, int]],
            on_progress: Callable[[str], None] = lambda what: None) -> dict[str, float]:
    """Run the warm-up requests; returns seconds per "task WxH"."""
    timings: dict[str, float] = {}
    steps = warmup.num_timesteps
    for width, height in sizes:
        image = _test_image(width, height)
        for task in warmup.tasks:
            what = f"{task} {width}x{height}"
            on_progress(what)
            start = time.perf_counter()
            if task == "t2i":
                params = ImageParams(height=height, width=width, num_timesteps=steps)
                for prompt in PROMPTS:
                    generate_image(executor, [prompt], params, noise=NoiseSource(0))
            elif task == "edit":
                params = with_overrides(EDIT_DEFAULTS, {"num_timesteps": steps})
                generate_image(executor, [image, "make it night"], params, noise=NoiseSource(0))
            else:
                understand(executor, [image, "Describe the picture."],
                           TextParams(max_new_tokens=warmup.max_new_tokens))
            timings[what] = time.perf_counter() - start
            log.info("warm-up: %s in %.2f s", what, timings[what])
    return timings


def _test_image(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    y = np.linspace(0, 255, height, dtype=np.uint8)
    pixels = np.stack([np.tile(x, (height, 1)), np.tile(y[:, None], (1, width)),
                       np.full((height, width), 128, np.uint8)], axis=-1)
    return Image.fromarray(pixels)
