"""`RecordingExecutor`: wraps an executor and records what the parity tests compare."""
from __future__ import annotations

from torch import Tensor

from bagel_model.segments import Segment
from pipelines.local import LocalExecutor


class RecordingExecutor:
    """Delegates to a LocalExecutor; snapshots KV caches at the first decode / denoise call and
    keeps the logits, ViT embeddings, VAE noise and latents and decoder outputs it passes along."""

    def __init__(self, inner: LocalExecutor):
        self.inner = inner
        self.config, self.tokenizer, self.device = inner.config, inner.tokenizer, inner.device
        self.caches_at_denoise: dict[str, dict[int, tuple[Tensor, Tensor]]] | None = None  # by context name
        self.caches_at_decode: dict[int, tuple[Tensor, Tensor]] | None = None
        self.denoise_calls: list[list[Segment]] = []
        self.logits: list[Tensor] = []
        self.vit: list[Tensor] = []
        self.vae_noise: list[Tensor] = []
        self.vae_latents: list[Tensor] = []
        self.decoded: list[Tensor] = []

    def cache_of(self, context_id: str) -> dict[int, tuple[Tensor, Tensor]]:
        out = {}
        for cache in self.inner.caches:
            for layer in cache.layers:
                entry = cache.get(context_id, layer)
                if entry is not None:
                    out[layer] = entry
        return out

    def prefill(self, segments):
        self.inner.prefill(segments)

    def decode(self, segments):
        if self.caches_at_decode is None:
            self.caches_at_decode = self.cache_of(segments[0].context_id)
        logits = self.inner.decode(segments)
        self.logits.append(logits[0])
        return logits

    def denoise(self, segments, step):
        if self.caches_at_denoise is None:  # every live context, keyed by its session name
            self.caches_at_denoise = {c.split("/")[-1].rstrip("0123456789"): self.cache_of(c)
                                      for c in self.inner.live_contexts()}
        self.denoise_calls.append(segments)
        return self.inner.denoise(segments, step)

    def fork(self, src, dst):
        self.inner.fork(src, dst)

    def free(self, context_ids):
        self.inner.free(context_ids)

    def live_contexts(self):
        return self.inner.live_contexts()

    def encode_vit(self, images):
        out = self.inner.encode_vit(images)
        self.vit += out
        return out

    def encode_vae(self, pixels, noise):
        self.vae_noise.append(noise)
        out = self.inner.encode_vae(pixels, noise)
        self.vae_latents.append(out)
        return out

    def decode_latents(self, latent):
        out = self.inner.decode_latents(latent)
        self.decoded.append(out)
        return out
