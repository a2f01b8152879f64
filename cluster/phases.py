"""Where a request's time goes: seconds per phase, added up per request.

Phases: `queue` (admitted to started: waiting for a worker thread and for KV-cache and image
memory), `encoder` (ViT and VAE encoder calls), `prefill` (context prefills, forks and frees on
the stages), `text` (token decoding), `denoise` (the sampler's step calls), `vae_decode` (the
decoder call, transfers included) and `encode_output` (the output image's PNG / JPEG / WebP
file); the HTTP layer adds `respond` (building the response body) and `total` (admission to
response). The service sends them as a `Server-Timing`
header, logs them and observes them in the `bagel_phase_seconds` histogram; the GPU serve
benchmark reads the header to split the Serve overhead.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager

# executor method -> phase
EXECUTOR_PHASES = {"encode_vit": "encoder", "encode_vae": "encoder", "prefill": "prefill", "fork": "prefill",
                   "free": "prefill", "decode": "text", "denoise": "denoise", "decode_latents": "vae_decode"}


@contextmanager
def timed(phases: MutableMapping[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start


class TimedExecutor:
    """An executor as one request sees it: every call is the wrapped executor's, and its
    duration is added to the request's phase times (`phases`, a dict that this request alone
    writes)."""

    def __init__(self, executor, phases: MutableMapping[str, float]):
        self._executor, self._phases = executor, phases

    def __getattr__(self, name: str):
        attribute = getattr(self._executor, name)
        phase = EXECUTOR_PHASES.get(name)
        if phase is None:
            return attribute
        return self._timed(attribute, phase)

    def _timed(self, method: Callable, phase: str) -> Callable:
        def call(*args, **kwargs):
            with timed(self._phases, phase):
                return method(*args, **kwargs)
        return call


def server_timing(phases: MutableMapping[str, float]) -> str:
    """The phases as an HTTP Server-Timing header value (milliseconds)."""
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in phases.items())
