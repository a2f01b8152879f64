"""Simulated stand-ins for a stage's runner, the ViT and the VAE: each call sleeps for what a
hardware `Profile` says the GPU would take, and returns tensors of the right shapes, so the real
service (routing, admission, micro-batch order, the denoising step protocol, the transport) runs
at realistic timings on a CPU-only machine with the full-size model's token counts.

Tensors stay small. Hidden states between stages keep their real row count (the next stage
checks it against its segments) but one feature column instead of `hidden_size`; the link time
is charged for the logical bytes. ViT embeddings likewise ([N, 1]). What the pipelines compute
with keeps its real shape and size: velocities and latents ([h*w, 64], 1 MB at 1024²), logits
([vocab]), VAE latents and decoded pixels. The KV cache keeps lengths, not tensors, with the real
cache's sharing between forks, so context bookkeeping, `/health` and leak checks behave as on a GPU.

Sleeps are deadlines from the call's start, so the CPU time of the bookkeeping itself is not
added on top; `time_scale` shrinks every sleep (tests run at 0.01, preserving ratios).
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import BagelConfig
from .cost import kv_bytes_per_token
from .demo import demo_tokenizer, write_config_folder
from .hardware import Block, Profile, load_profile
from .segments import PackedLayout, Segment, SegmentKind
from .stage import StageSpec

SIMULATION_VERSION = 1


@dataclass(frozen=True)
class Simulation:
    """A simulated GPU: the profile that times its work, and the real seconds per simulated one."""

    profile: Profile
    time_scale: float = 1.0

    @classmethod
    def named(cls, profile: str, time_scale: float = 1.0) -> Simulation:
        """The hardware profile `profile` of hardware.json, calibrated from bench/results."""
        return cls(load_profile(profile), time_scale)

    def wait(self, seconds: float, since: float) -> None:
        """Sleep until `seconds` of simulated time after `since` (a `time.perf_counter()`)."""
        remaining = since + seconds * self.time_scale - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)


class SimulatedKVCache:
    """Per context, the length of its cache and the identity of its storage. A fork shares its
    parent's storage until one of them appends (appending makes new storage, as `KVCache` does),
    so `nbytes` counts what a GPU would hold."""

    def __init__(self, layers: range, bytes_per_token: int):
        self.layers, self.bytes_per_token = layers, bytes_per_token
        self._data: dict[str, tuple[int, int]] = {}  # context -> (storage id, tokens)
        self._storage = itertools.count()

    def length(self, context_id: str) -> int:
        return self._data.get(context_id, (0, 0))[1]

    def append(self, context_id: str, tokens: int) -> None:
        self._data[context_id] = (next(self._storage), self.length(context_id) + tokens)

    def fork(self, src: str, dst: str) -> None:
        if dst in self._data:
            raise ValueError(f"context {dst!r} already exists")
        self._data[dst] = self._data.get(src, (next(self._storage), 0))

    def free(self, context_ids: list[str]) -> None:
        for context_id in context_ids:
            self._data.pop(context_id, None)

    def context_ids(self) -> list[str]:
        return list(self._data)

    def nbytes(self, context_ids: list[str] | None = None) -> int:
        data = self._data if context_ids is None else {c: self._data[c] for c in context_ids if c in self._data}
        return self.bytes_per_token * sum(dict(data.values()).values())


class SimulatedRunner:
    """`StageRunner`'s interface for one stage: `run` charges the micro-batch's simulated time
    (the hop from the previous stage, the layers, the heads on the last stage) to a simulated
    GPU and returns placeholder hidden states or the last stage's per-segment outputs.

    The simulated GPU runs its calls back to back, after the host has queued them, as a real one
    does: a first or middle stage's hidden states leave at once, so `run` sleeps until its call
    is done; the last stage's outputs may stay on the device (the sampler's state), so it returns
    at once and whoever reads them first calls `synchronize`. The host's own time then overlaps
    the device's where it does on a GPU, which a slower, shared CPU and time scales below 1 need."""

    def __init__(self, config: BagelConfig, spec: StageSpec, simulation: Simulation, dtype: torch.dtype):
        self.config, self.spec, self.simulation, self.dtype = config, spec, simulation, dtype
        profile = simulation.profile
        self.cache = SimulatedKVCache(spec.layers, kv_bytes_per_token(config.llm, profile.dtype_bytes, len(spec.layers)))
        self.device = torch.device("cpu")
        self.compute_s = self.link_s = 0.0  # simulated seconds so far
        self._done_at = 0.0  # when the simulated GPU finishes its queued work (`time.perf_counter()`)

    @property
    def busy_s(self) -> float:
        """Real seconds the simulated GPU has worked (its time at this time scale)."""
        return (self.compute_s + self.link_s) * self.simulation.time_scale

    def _queue(self, seconds: float, start: float) -> None:
        """The GPU runs `seconds` of simulated work once its queue reaches it."""
        self._done_at = max(start, self._done_at) + seconds * self.simulation.time_scale

    def synchronize(self) -> None:
        """Wait for the simulated GPU's queued work (results leave the device)."""
        remaining = self._done_at - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)

    def run(self, segments: list[Segment], hidden: Tensor | None = None) -> Tensor | list[Tensor | None]:
        start = time.perf_counter()
        layout = PackedLayout.build(segments, self.device)  # the real call's validation
        if (hidden is None) != self.spec.is_first or (hidden is not None and hidden.shape[0] != layout.num_tokens):
            raise ValueError(f"{self.spec}: hidden states {None if hidden is None else tuple(hidden.shape)} "
                             f"do not fit a call of {layout.num_tokens} tokens")
        profile, llm = self.simulation.profile, self.config.llm
        blocks = [Block(s.num_tokens, self.cache.length(s.context_id), s.has_latents, s.want_logits,
                        s.kind is SegmentKind.NOISE) for s in segments]
        compute = profile.forward_s(llm, blocks, len(self.spec.layers), self.spec.is_last)
        copy = profile.link.copy_s(profile.hidden_bytes(llm, layout.num_tokens))
        link = 0.0 if self.spec.is_first else profile.link.latency_s + copy  # receiving this call's input
        if not self.spec.is_last:
            link += (profile.link.copies - 1) * copy  # sending through host memory: the sender's copy
        for s in segments:
            if s.updates_cache:
                self.cache.append(s.context_id, s.num_tokens)
        out = self._outputs(segments) if self.spec.is_last else torch.zeros(layout.num_tokens, 1, dtype=self.dtype)
        self.compute_s += compute
        self.link_s += link
        self._queue(compute + link, start)
        if not self.spec.is_last:
            self.synchronize()
        return out

    def _outputs(self, segments: list[Segment]) -> list[Tensor | None]:
        llm, outputs = self.config.llm, []
        for s in segments:
            if s.kind is SegmentKind.TEXT and s.want_logits:
                outputs.append(torch.zeros(llm.vocab_size, dtype=self.dtype))
            elif s.kind is SegmentKind.NOISE:
                outputs.append(torch.zeros(s.grid[0] * s.grid[1], self.config.patch_latent_dim, dtype=self.dtype))
            else:
                outputs.append(None)
        return outputs

    def fork(self, src: str, dst: str) -> None:
        self.cache.fork(src, dst)

    def export_context(self, context_id: str) -> Tensor | None:
        """`StageRunner.export_context`: the context's token count, after the link time of its
        K/V bytes (a branch group's fork moving to another group)."""
        tokens = self.cache.length(context_id)
        if context_id not in self.cache.context_ids():
            return None
        start, link = time.perf_counter(), self.simulation.profile.link
        seconds = link.seconds(tokens * self.cache.bytes_per_token)
        self.link_s += seconds
        self._queue(seconds, start)
        self.synchronize()
        return torch.tensor([tokens])

    def import_context(self, context_id: str, packed: Tensor) -> None:
        if context_id in self.cache.context_ids():
            raise ValueError(f"context {context_id!r} already exists")
        self.cache.append(context_id, int(packed[0]))

    def free(self, context_ids: list[str]) -> None:
        self.cache.free(context_ids)


class SimulatedVisionEncoder:
    """`VisionEncoder.embed_images` in simulated time: [N, 1] placeholders for N patches each."""

    def __init__(self, config: BagelConfig, simulation: Simulation):
        self.config, self.simulation = config, simulation

    def embed_images(self, images: list[Tensor]) -> list[Tensor]:
        start, p = time.perf_counter(), self.config.vit.patch_size
        lengths = [(img.shape[-2] // p) * (img.shape[-1] // p) for img in images]
        self.simulation.wait(self.simulation.profile.vit_s(self.config, lengths), start)
        return [torch.zeros(n, 1) for n in lengths]


class SimulatedAutoEncoder:
    """`AutoEncoder.encode` / `encode_mean` / `decode` in simulated time. Latents are zeros (so a
    preview map fitted to them paints the mean colour); decoded pixels are a fixed random pattern,
    like the images of the random-weight models we measured (their PNG encoding costs what it
    cost there)."""

    def __init__(self, config: BagelConfig, simulation: Simulation):
        self.config, self.cfg, self.simulation = config, config.vae, simulation
        self._pixels: dict[tuple, Tensor] = {}

    def encode(self, pixels: Tensor, noise: Tensor | None = None, generator=None) -> Tensor:
        return self.encode_mean(pixels)

    def encode_mean(self, pixels: Tensor) -> Tensor:
        start, (b, _, h, w), f = time.perf_counter(), pixels.shape, self.cfg.downsample
        self.simulation.wait(b * self.simulation.profile.vae_encode_s(self.config, h, w), start)
        return torch.zeros(b, self.cfg.z_channels, h // f, w // f)

    def decode(self, z_scaled: Tensor) -> Tensor:
        start, (b, _, h, w), f = time.perf_counter(), z_scaled.shape, self.cfg.downsample
        shape = (b, self.cfg.out_ch, h * f, w * f)
        if shape not in self._pixels:
            self._pixels[shape] = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.simulation.wait(b * self.simulation.profile.vae_decode_s(self.config, h * f, w * f), start)
        return self._pixels[shape]


def simulation_checkpoint_dir(cache_dir: str | Path | None = None) -> Path:
    """A folder with the released BAGEL-7B-MoT's configuration and the demo tokenizer, no
    weights: what simulated deployments load by default (`$BAGEL_DEMO_DIR` or
    `~/.cache/bagel-serve`)."""
    root = Path(cache_dir or os.environ.get("BAGEL_DEMO_DIR") or Path.home() / ".cache" / "bagel-serve")
    target = root / f"simulated-7b-v{SIMULATION_VERSION}"
    if (target / "tokenizer.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="simulated-", dir=root))
    write_config_folder(tmp, BagelConfig(), demo_tokenizer(),
                        comment="BAGEL-7B-MoT configuration without weights, for simulated deployments")
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
