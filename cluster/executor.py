"""`ClusterExecutor`: the pipelines' executor seam over the Ray Serve application.

LLM work goes through the `StageGroup` (hidden states stage to stage, device to device); image
encoding and decoding go to the encoder and decoder deployments. Logits come back on the CPU.
Denoising keeps each image's latents on the last stage, which applies every step's guidance and
Euler update itself; a step is submitted before the previous one is awaited, so the stages never
wait for this process between steps (progress runs one step ahead of the GPU). With several
stages the CFG branches of a step travel as separate micro-batches, so stage k can work on one
while stage k+1 works on another; with one stage they are packed into one call.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import ray
import torch
from torch import Tensor

from bagel_model.config import BagelConfig
from bagel_model.segments import Segment
from bagel_model.tokenizer import BagelTokenizer
from pipelines.step import EulerStep, StepOutput, StepPart

from .stage_group import StageGroup


class ClusterExecutor:
    device = torch.device("cpu")

    def __init__(self, config: BagelConfig, tokenizer: BagelTokenizer, stages: StageGroup,
                 encoder, decoder, split_branches: bool | None = None):
        self.config, self.tokenizer, self.stages = config, tokenizer, stages
        self.encoder, self.decoder = encoder, decoder
        self.split_branches = len(stages.workers) > 1 if split_branches is None else split_branches
        self._in_flight: dict[str, list[tuple[int, ray.ObjectRef]]] = {}  # image key -> its last step
        self._latent_rgb: Tensor | None = None  # the decoder's preview map, asked for once

    def prefill(self, segments: list[Segment]) -> None:
        self.stages.run([segments])

    def decode(self, segments: list[Segment]) -> list[Tensor]:
        return self.stages.run([segments])[0]

    def denoise(self, segments: list[Segment], step: EulerStep) -> StepOutput:
        """Submit the step, then wait for the previous one; the final step waits for itself and
        returns the latents."""
        key, x0 = segments[0].context_id, segments[0].latents
        if self.split_branches:
            batches = [([s], (b,)) for s, b in zip(segments, step.run, strict=True)]
        else:
            batches = [(segments, step.run)]
        previous = self._in_flight.pop(key, None)
        # Several stages: the first embeds what the last returned for the previous step.
        latents = previous[-1][1] if previous and len(self.stages.workers) > 1 else None
        submitted = [self.stages.submit(b, StepPart(key, step, branches, x0 if i == 0 else None), latents)
                     for i, (b, branches) in enumerate(batches)]
        self._in_flight[key] = submitted
        if previous:
            self.stages.wait(previous)
        if not step.final:
            return StepOutput()
        del self._in_flight[key]
        return StepOutput(x=self.stages.wait(submitted)[-1])

    def predicted_clean(self, context_id: str) -> Callable[[], Tensor]:
        """Asked of the last stage, which keeps the image's state, queued behind the step."""
        ref = self.stages.call_last("predicted_clean", context_id)
        return lambda: ray.get(ref)

    def fork(self, src: str, dst: str) -> None:
        self.stages.broadcast("fork", src, dst)

    def free(self, context_ids: list[str]) -> None:
        for key in context_ids:
            in_flight = self._in_flight.pop(key, None)
            if in_flight:  # the request stopped with a step queued: let it end before its memory goes
                with contextlib.suppress(Exception):  # the request is over; its own error was raised
                    self.stages.wait(in_flight)
        self.stages.broadcast("free", context_ids)

    def live_contexts(self) -> list[str]:
        """Contexts with KV cache and images with latents on any stage."""
        return sorted({c for s in self.stages.broadcast("stats") for c in s["context_ids"] + s["latent_states"]})

    def encode_vit(self, images: list[Tensor]) -> list[Tensor]:
        return self.encoder.encode_vit.remote(images).result()

    def encode_vae(self, pixels: Tensor, noise: Tensor) -> Tensor:
        return self.encoder.encode_vae.remote(pixels, noise).result()

    def decode_latents(self, latent: Tensor) -> Tensor:
        return self.decoder.decode.remote(latent).result()

    def latent_rgb_map(self) -> Tensor:
        if self._latent_rgb is None:
            self._latent_rgb = self.decoder.latent_rgb_map.remote().result()
        return self._latent_rgb
