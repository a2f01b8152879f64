"""`ClusterExecutor`: the pipelines' executor seam over the Ray Serve application.

LLM work goes through the `StageGroup` (hidden states stage to stage, device to device); image
encoding and decoding go to the encoder and decoder deployments. Velocities and logits come back
on the CPU, where the sampler keeps its latent state. With several stages the CFG branches of a
step travel as separate micro-batches, so stage k can work on one while stage k+1 works on
another; with one stage they are packed into one call.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bagel_model.config import BagelConfig
from bagel_model.segments import Segment
from bagel_model.tokenizer import BagelTokenizer

from .stage_group import StageGroup


class ClusterExecutor:
    device = torch.device("cpu")

    def __init__(self, config: BagelConfig, tokenizer: BagelTokenizer, stages: StageGroup,
                 encoder, decoder, split_branches: bool | None = None):
        self.config, self.tokenizer, self.stages = config, tokenizer, stages
        self.encoder, self.decoder = encoder, decoder
        self.split_branches = len(stages.workers) > 1 if split_branches is None else split_branches

    def prefill(self, segments: list[Segment]) -> None:
        self.stages.run([segments])

    def decode(self, segments: list[Segment]) -> list[Tensor]:
        return self.stages.run([segments])[0]

    def denoise(self, segments: list[Segment]) -> list[Tensor]:
        if self.split_branches and len(segments) > 1:
            return [out[0] for out in self.stages.run([[s] for s in segments])]
        return self.stages.run([segments])[0]

    def fork(self, src: str, dst: str) -> None:
        self.stages.broadcast("fork", src, dst)

    def free(self, context_ids: list[str]) -> None:
        self.stages.broadcast("free", context_ids)

    def live_contexts(self) -> list[str]:
        return sorted({c for s in self.stages.broadcast("stats") for c in s["context_ids"]})

    def encode_vit(self, images: list[Tensor]) -> list[Tensor]:
        return self.encoder.encode_vit.remote(images).result()

    def encode_vae(self, pixels: Tensor, noise: Tensor) -> Tensor:
        return self.encoder.encode_vae.remote(pixels, noise).result()

    def decode_latents(self, latent: Tensor) -> Tensor:
        return self.decoder.decode.remote(latent).result()
