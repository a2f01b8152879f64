"""`LocalExecutor`: the executor seam in this process (CPU or GPU), 1..N `BagelStage`s run one
after another. Thread-safe: requests on several threads share it, their denoising steps batched
into shared forwards by a `StepBatcher` (pipelines/batching.py)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from bagel_model.config import BagelConfig
from bagel_model.cost import kv_bytes_per_token
from bagel_model.kernels import EAGER, Kernels
from bagel_model.kv_cache import KVCache
from bagel_model.latent_rgb import fit_latent_rgb
from bagel_model.loader import load_stage, load_vae, load_vision_encoder
from bagel_model.model import BagelStage
from bagel_model.quantize import quantize_gen_mlp
from bagel_model.runner import StageRunner
from bagel_model.segments import Segment
from bagel_model.stage import split_layers
from bagel_model.tokenizer import BagelTokenizer
from bagel_model.vae import AutoEncoder
from bagel_model.vit import VisionEncoder

from .batching import BATCH_WAIT_S, MAX_BATCH_TOKENS, StepBatcher, StepCall
from .prefix_cache import PrefixCache
from .step import EulerStep, SamplerStates, StepOutput, StepPart


class LocalExecutor:
    """All stages in this process, run one after another."""

    def __init__(self, config: BagelConfig, tokenizer: BagelTokenizer, stages: list[BagelStage],
                 vision: VisionEncoder, vae: AutoEncoder, decode_slots: int = 8, graphs: bool | None = None,
                 max_batch_tokens: int = MAX_BATCH_TOKENS, batch_wait_s: float = BATCH_WAIT_S,
                 on_forward: Callable[[int], None] | None = None, prefix_cache_bytes: int | None = None):
        """`decode_slots`: contexts the fast decode path holds at once per stage (0: off);
        `graphs`: CUDA graphs for decode steps and denoising forwards (default: on CUDA);
        `max_batch_tokens`, `batch_wait_s`, `on_forward`: the `StepBatcher`'s (0 tokens: each
        step runs alone); `prefix_cache_bytes`: the prefix cache's budget per stage
        (pipelines/prefix_cache.py; None: no cache)."""
        self.config, self.tokenizer = config, tokenizer
        self.stages, self.vision, self.vae = stages, vision, vae
        self.runners = [StageRunner(s, tokenizer.image_markers, decode_slots=decode_slots, graphs=graphs)
                        for s in stages]
        self.device = stages[-1].device
        self.samplers = SamplerStates(self.device)
        self._latent_rgb: Tensor | None = None  # fitted on first use (previews)
        self._lock = threading.RLock()  # one model call at a time; caches and states change under it
        self.batcher = StepBatcher(self._denoise_batch, max_batch_tokens, batch_wait_s, on_forward) \
            if max_batch_tokens else None
        self.prefix_cache = None if prefix_cache_bytes is None else PrefixCache(
            self, prefix_cache_bytes,
            kv_bytes_per_token(config.llm, stages[0].dtype.itemsize, max(len(c.layers) for c in self.caches)))

    @property
    def caches(self) -> list[KVCache]:
        return [r.cache for r in self.runners]

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, *, num_stages: int = 1,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                        vae_dtype: torch.dtype = torch.float32, fp8: bool = False,
                        graphs: bool | None = None, quantize: str | None = None,
                        quantize_vit: bool = False, kernels: Kernels = EAGER,
                        max_batch_tokens: int = MAX_BATCH_TOKENS, batch_wait_s: float = BATCH_WAIT_S,
                        on_forward: Callable[[int], None] | None = None,
                        prefix_cache_bytes: int | None = None) -> LocalExecutor:
        """`fp8`: APPROXIMATE FP8 GEMMs in the generation expert's MLP (`quantize_gen_mlp`);
        `graphs`, `max_batch_tokens`, `batch_wait_s`, `on_forward`, `prefix_cache_bytes`: as in
        the constructor; `quantize`: the LLM layers' weight format, also the ViT's with
        `quantize_vit` (bagel_model/quantize.py); `kernels`: what the stages run (bagel_model/kernels.py)."""
        config = BagelConfig.from_checkpoint_dir(checkpoint_dir)
        tokenizer = BagelTokenizer.from_dir(checkpoint_dir)
        specs = split_layers(config.llm.num_hidden_layers, num_stages)
        stages = [load_stage(checkpoint_dir, config, s, device=device, dtype=dtype, quantize=quantize,
                             kernels=kernels) for s in specs]
        if fp8:
            stages = [quantize_gen_mlp(s) for s in stages]
        vision = load_vision_encoder(checkpoint_dir, config, device=device, dtype=dtype,
                                     quantize=quantize if quantize_vit else None)
        vae = load_vae(checkpoint_dir, config, device=device, dtype=vae_dtype)
        return cls(config, tokenizer, stages, vision, vae, graphs=graphs, max_batch_tokens=max_batch_tokens,
                   batch_wait_s=batch_wait_s, on_forward=on_forward, prefix_cache_bytes=prefix_cache_bytes)

    def _run(self, segments: list[Segment]) -> list[Tensor | None]:
        with self._lock:
            out = None
            for runner in self.runners:
                out = runner.run(segments, out)
            return out

    def prefill(self, segments: list[Segment]) -> None:
        self._run(segments)

    def decode(self, segments: list[Segment]) -> list[Tensor]:
        return self._run(segments)

    def denoise(self, segments: list[Segment], step: EulerStep) -> StepOutput:
        """Returns the latents after every step (they are on hand here)."""
        if self.batcher is not None:
            return self.batcher.denoise(segments, step)
        out = self._denoise_batch([StepCall(segments, step)])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def _denoise_batch(self, calls: list[StepCall]) -> list[StepOutput | BaseException]:
        """The steps of several images in one forward. A step its image's state refuses is left
        out (its error is its result); if the shared forward fails, each step runs alone, so
        only the one at fault fails."""
        results: list[StepOutput | BaseException | None] = [None] * len(calls)
        with self._lock:
            parts, segments, joined = [], [], []
            for i, call in enumerate(calls):
                part = StepPart(call.key, call.step, call.step.run, x0=call.segments[0].latents)
                try:
                    self.samplers.check(part)
                    segments += self.samplers.fill([part], call.segments)
                except Exception as e:
                    results[i] = e
                    continue
                parts.append(part)
                joined.append(i)
            if not parts:
                return results
            try:
                velocities = self._run(segments)
            except Exception as e:
                if len(parts) == 1:
                    results[joined[0]] = e
                    return results
                for i in joined:
                    results[i] = self._denoise_batch([calls[i]])[0]
                return results
            outputs = self.samplers.collect(parts, velocities)
        for i, part in zip(joined, parts):
            results[i] = outputs[part.key]
        return results

    def predicted_clean(self, context_id: str) -> Callable[[], Tensor]:
        """On a GPU the copy to the host is queued behind the step, so the next step's kernels
        are queued without waiting for it; the returned function waits."""
        with self._lock:
            clean = self.samplers.predicted_clean(context_id)
        if clean.device.type != "cuda":
            return lambda: clean
        host = torch.empty(clean.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(clean, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return lambda: (copied.synchronize(), host)[1]

    def fork(self, src: str, dst: str) -> None:
        with self._lock:
            for runner in self.runners:
                runner.fork(src, dst)

    def free(self, context_ids: list[str]) -> None:
        with self._lock:
            for runner in self.runners:
                runner.free(context_ids)
            self.samplers.free(context_ids)
        if self.batcher is not None:
            self.batcher.forget(context_ids)

    def live_contexts(self) -> list[str]:
        """Contexts with KV cache or sampler state."""
        with self._lock:
            return sorted({c for cache in self.caches for c in cache.context_ids()} | set(self.samplers.keys()))

    def encode_vit(self, images: list[Tensor]) -> list[Tensor]:
        return self.vision.embed_images(images)

    @torch.inference_mode()
    def encode_vae(self, pixels: Tensor, noise: Tensor) -> Tensor:
        device = self.vae.encoder.conv_in.weight.device
        return self.vae.encode(pixels.to(device), noise=noise.to(device))

    @torch.inference_mode()
    def decode_latents(self, latent: Tensor) -> Tensor:
        return self.vae.decode(latent.to(self.vae.encoder.conv_in.weight.device)).float()

    def latent_rgb_map(self) -> Tensor:
        if self._latent_rgb is None:
            self._latent_rgb = fit_latent_rgb(self.vae)
        return self._latent_rgb
