"""The executor seam: everything the pipelines ask of the model, and the in-process executor.

Pipelines build `Segment`s for contexts they name by `context_id`; an executor owns the weights
and the KV caches. `LocalExecutor` runs 1..N `BagelStage`s one after another in this process
(CPU or GPU); the distributed service implements the same protocol over Ray.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from bagel_model.config import BagelConfig
from bagel_model.fp8 import quantize_gen_mlp
from bagel_model.kv_cache import KVCache
from bagel_model.loader import load_stage, load_vae, load_vision_encoder
from bagel_model.model import BagelStage
from bagel_model.runner import StageRunner
from bagel_model.segments import Segment
from bagel_model.stage import split_layers
from bagel_model.tokenizer import BagelTokenizer
from bagel_model.vae import AutoEncoder
from bagel_model.vit import VisionEncoder

if TYPE_CHECKING:
    from .sampler import EulerStep, StepOutput


class Executor(Protocol):
    config: BagelConfig
    tokenizer: BagelTokenizer
    device: torch.device  # where returned logits live

    def prefill(self, segments: list[Segment]) -> None:
        """Append the segments' tokens to their contexts' caches."""

    def decode(self, segments: list[Segment]) -> list[Tensor]:
        """Append text segments and return each one's last-token logits [vocab]."""

    def denoise(self, segments: list[Segment], step: EulerStep) -> StepOutput:
        """One sampler step over the noise segments of one image (caches read only): their
        velocities, combined and applied by `step`. Segments with `latents=None` mean the
        latents this executor kept from the image's previous step."""

    def fork(self, src: str, dst: str) -> None:
        """Context `dst` becomes a copy of `src` (empty if `src` has no cache)."""

    def free(self, context_ids: list[str]) -> None:
        """Drop the caches of these contexts (unknown ids are ignored)."""

    def live_contexts(self) -> list[str]:
        """Context ids that hold cache memory on any stage."""

    def encode_vit(self, images: list[Tensor]) -> list[Tensor]:
        """ViT-transformed pixels [3, H, W] in [-1, 1] -> LLM embeddings [N, hidden] each."""

    def encode_vae(self, pixels: Tensor, noise: Tensor) -> Tensor:
        """Pixels [1, 3, H, W] -> scaled latent [1, z, H/8, W/8], posterior noise injected."""

    def decode_latents(self, latent: Tensor) -> Tensor:
        """Scaled latent [1, z, H/8, W/8] -> raw decoder output [1, 3, H, W] (float32)."""


class LocalExecutor:
    """All stages in this process, run one after another."""

    def __init__(self, config: BagelConfig, tokenizer: BagelTokenizer, stages: list[BagelStage],
                 vision: VisionEncoder, vae: AutoEncoder, decode_slots: int = 8, graphs: bool | None = None):
        """`decode_slots`: contexts the fast decode path holds at once per stage (0: off);
        `graphs`: CUDA graphs for decode steps and denoising forwards (default: on CUDA)."""
        self.config, self.tokenizer = config, tokenizer
        self.stages, self.vision, self.vae = stages, vision, vae
        markers = (tokenizer.vision_start_id, tokenizer.vision_end_id)
        self.runners = [StageRunner(s, markers, decode_slots=decode_slots, graphs=graphs) for s in stages]
        self.device = stages[-1].device
        self._differences: dict[str, dict] = {}  # per image (COND context): see EulerStep.apply

    @property
    def caches(self) -> list[KVCache]:
        return [r.cache for r in self.runners]

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, *, num_stages: int = 1,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                        vae_dtype: torch.dtype = torch.float32, fp8: bool = False,
                        graphs: bool | None = None) -> LocalExecutor:
        """`fp8`: APPROXIMATE FP8 GEMMs in the generation expert's MLP (bagel_model/fp8.py);
        `graphs`: as in the constructor."""
        config = BagelConfig.from_checkpoint_dir(checkpoint_dir)
        tokenizer = BagelTokenizer.from_dir(checkpoint_dir)
        specs = split_layers(config.llm.num_hidden_layers, num_stages)
        stages = [load_stage(checkpoint_dir, config, s, device=device, dtype=dtype) for s in specs]
        if fp8:
            stages = [quantize_gen_mlp(s) for s in stages]
        vision = load_vision_encoder(checkpoint_dir, config, device=device, dtype=dtype)
        vae = load_vae(checkpoint_dir, config, device=device, dtype=vae_dtype)
        return cls(config, tokenizer, stages, vision, vae, graphs=graphs)

    def _run(self, segments: list[Segment]) -> list[Tensor | None]:
        out = None
        for runner in self.runners:
            out = runner.run(segments, out)
        return out

    def prefill(self, segments: list[Segment]) -> None:
        self._run(segments)

    def decode(self, segments: list[Segment]) -> list[Tensor]:
        return self._run(segments)

    def denoise(self, segments: list[Segment], step: EulerStep) -> StepOutput:
        x = segments[0].latents.to(self.device, torch.float32)
        refresh = step.params.cfg_refresh_interval > 1
        differences = self._differences.setdefault(segments[0].context_id, {}) if refresh else {}
        return step.apply(x, self._run(segments), differences)

    def fork(self, src: str, dst: str) -> None:
        for runner in self.runners:
            runner.fork(src, dst)

    def free(self, context_ids: list[str]) -> None:
        for runner in self.runners:
            runner.free(context_ids)
        for key in context_ids:
            self._differences.pop(key, None)

    def live_contexts(self) -> list[str]:
        """Contexts with KV cache or sampler state."""
        return sorted({c for cache in self.caches for c in cache.context_ids()} | set(self._differences))

    def encode_vit(self, images: list[Tensor]) -> list[Tensor]:
        return self.vision.embed_images(images)

    @torch.inference_mode()
    def encode_vae(self, pixels: Tensor, noise: Tensor) -> Tensor:
        device = self.vae.encoder.conv_in.weight.device
        return self.vae.encode(pixels.to(device), noise=noise.to(device))

    @torch.inference_mode()
    def decode_latents(self, latent: Tensor) -> Tensor:
        return self.vae.decode(latent.to(self.vae.encoder.conv_in.weight.device)).float()
