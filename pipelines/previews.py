"""Preview images of an image in the making (OpenAI's `partial_images`).

BAGEL's flow-matching sampler predicts the clean image at every step: x0 = x_t - t * v. A
request asks for up to a few previews; `preview_steps` spreads them evenly over the steps (never
the last one: that is the image itself). The executor hands each preview's latents over without
waiting for the step (`Executor.predicted_clean`), and a `PreviewRenderer` turns them into
pictures on another thread, so the denoising never waits for a preview.

Two decoders (measured in bench/previews.py):
  * "linear": a fitted linear latent-to-RGB map (bagel_model/latent_rgb.py) at latent resolution
    (1/8 of each side, 128x128 for a 1024x1024 image); about a millisecond;
  * "vae": the VAE decoder at full size, the same decode as the final image's.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor as Pool
from concurrent.futures import Future
from dataclasses import dataclass

from PIL import Image
from torch import Tensor

from bagel_model.latent_rgb import latent_rgb
from bagel_model.latents import to_uint8

from .executor import Executor

PREVIEW_DECODERS = ("linear", "vae")
MAX_PREVIEWS = 3  # OpenAI's partial_images range is 0..3


def preview_steps(num_steps: int, count: int) -> list[int]:
    """0-based indices of the steps after which `count` previews are taken: evenly spread,
    never the last step, fewer when there are not enough steps."""
    last = num_steps - 2  # the step before the final one
    if count <= 0 or last < 0:
        return []
    return sorted({min(-(-(k + 1) * num_steps // (count + 1)) - 1, last) for k in range(count)})  # ceil - 1


@dataclass(frozen=True)
class Preview:
    """One preview of an image: which one, after which step, and its latents."""

    index: int  # 0-based, in order
    step: int  # 1-based step it follows
    num_steps: int
    width: int  # the final image's size
    height: int
    latent: Callable[[], Tensor]  # the predicted clean latent [1, z, H/8, W/8] (waits for it)


def render_preview(executor: Executor, latent: Tensor, decoder: str) -> Image.Image:
    """The picture of a preview latent [1, z, H/8, W/8]."""
    if decoder == "linear":
        return Image.fromarray(latent_rgb(latent, executor.latent_rgb_map()).numpy())
    if decoder == "vae":
        return Image.fromarray(to_uint8(executor.decode_latents(latent).cpu()).numpy())
    raise ValueError(f"unknown preview decoder {decoder!r}: one of {PREVIEW_DECODERS}")


class PreviewRenderer:
    """Renders an image's previews on `pool`, one after another in order, and hands each
    picture to `on_image`. Use it as `generate_image`'s `on_preview`; `wait()` then returns
    once every preview has been handed over (and raises the first failure); `cancel()` skips
    those not started yet."""

    def __init__(self, executor: Executor, decoder: str, pool: Pool,
                 on_image: Callable[[Preview, Image.Image], None]):
        if decoder not in PREVIEW_DECODERS:
            raise ValueError(f"unknown preview decoder {decoder!r}: one of {PREVIEW_DECODERS}")
        self.executor, self.decoder, self.pool, self.on_image = executor, decoder, pool, on_image
        self._futures: list[Future] = []
        self._cancelled = threading.Event()

    def __call__(self, preview: Preview) -> None:
        previous = self._futures[-1] if self._futures else None
        self._futures.append(self.pool.submit(self._render, preview, previous))

    def _render(self, preview: Preview, previous: Future | None) -> None:
        if previous is not None:  # submitted earlier, so already running or done: keeps the order
            previous.exception()
        if self._cancelled.is_set():
            return
        image = render_preview(self.executor, preview.latent(), self.decoder)
        if not self._cancelled.is_set():
            self.on_image(preview, image)

    def wait(self) -> None:
        for future in self._futures:
            future.result()

    def cancel(self) -> None:
        self._cancelled.set()
