"""The executor seam: everything the pipelines ask of the model.

Pipelines build `Segment`s for contexts they name by `context_id`; an executor owns the weights,
the KV caches and the images' sampler state (pipelines/step.py). `LocalExecutor`
(pipelines/local.py) runs the model in this process; the distributed service implements the same
protocol over Ray (cluster/executor.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from bagel_model.config import BagelConfig
from bagel_model.segments import Segment
from bagel_model.tokenizer import BagelTokenizer

from .prefix_cache import PrefixCache
from .step import EulerStep, StepOutput


class Executor(Protocol):
    config: BagelConfig
    tokenizer: BagelTokenizer
    device: torch.device  # where returned logits live
    prefix_cache: PrefixCache | None  # prompt prefixes kept across requests (None: off)

    def prefill(self, segments: list[Segment]) -> None:
        """Append the segments' tokens to their contexts' caches."""

    def decode(self, segments: list[Segment]) -> list[Tensor]:
        """Append text segments and return each one's last-token logits [vocab]."""

    def denoise(self, segments: list[Segment], step: EulerStep) -> StepOutput:
        """One sampler step of one image (caches read only): the noise segments of `step.run`,
        in that order, the first one's context naming the image. The first step's segments
        carry the initial latents, later ones none: the executor keeps the latents between
        steps and applies `step` to them. Requests on other threads may call it at the same
        time: their steps then share forwards (pipelines/batching.py)."""

    def predicted_clean(self, context_id: str) -> Callable[[], Tensor]:
        """For previews: the clean latent tokens [h*w, patch_latent_dim] (float32, CPU) that the
        last step applied to the image named by `context_id` predicts (x_t - t * v). Asking
        never waits for that step; calling the returned function does."""

    def fork(self, src: str, dst: str) -> None:
        """Context `dst` becomes a copy of `src` (empty if `src` has no cache)."""

    def free(self, context_ids: list[str]) -> None:
        """Drop the caches of these contexts and the sampler state of images they name
        (unknown ids are ignored)."""

    def live_contexts(self) -> list[str]:
        """Context ids that hold cache memory or sampler state anywhere."""

    def encode_vit(self, images: list[Tensor]) -> list[Tensor]:
        """ViT-transformed pixels [3, H, W] in [-1, 1] -> LLM embeddings [N, hidden] each."""

    def encode_vae(self, pixels: Tensor, noise: Tensor) -> Tensor:
        """Pixels [1, 3, H, W] -> scaled latent [1, z, H/8, W/8], posterior noise injected."""

    def decode_latents(self, latent: Tensor) -> Tensor:
        """Scaled latent [1, z, H/8, W/8] -> raw decoder output [1, 3, H, W] (float32)."""

    def latent_rgb_map(self) -> Tensor:
        """The VAE's linear latent-to-RGB map [z + 1, 3] (bagel_model/latent_rgb.py), fitted once."""
