"""`ClusterExecutor`: the pipelines' executor seam over one replica's stage workers.

LLM work goes through the `StageGroup` (hidden states stage to stage, device to device); image
encoding and decoding go to the encoder and decoder deployments. Logits come back on the CPU.

Branch groups (CFG-parallel): every context lives on one branch group, chosen when it first
appears. A request's COND context goes to the group with the fewest requests based there, its
text-free context to the next group and its image-free context to the one after (as far as
there are groups); other contexts (a decode fork) stay with their source. Prefills and decodes
run on their contexts' groups, all at once; a fork whose copy belongs to another group moves the
K/V there stage by stage.

Denoising keeps each image's latents on the last stage of its COND group (the state owner),
which applies every step's guidance and Euler update itself: the other groups' last stages send
it their velocities, and before a step whose first stages are other processes it shares the
latents with them, device to device. A step is submitted before the previous one is awaited, so
the stages never wait for this process between steps (progress runs one step ahead of the GPU);
except where its first stages would wait for the previous step's latents while other images
are being denoised: a stage works through its calls in order, so such a step would stall the
others' ready micro-batches behind it (measured with bench/simulate.py: 3 stages reach 2.0x of
one stage's throughput that way, 2.8x when the step waits here instead).
With several stages the CFG branches a group runs travel as separate micro-batches, so stage k
can work on one while stage k+1 works on another; with one stage they are packed into one call.
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable

import ray
import torch
from torch import Tensor

from bagel_model.config import BagelConfig
from bagel_model.segments import Segment
from bagel_model.tokenizer import BagelTokenizer
from pipelines.context import context_name
from pipelines.guidance import Branch
from pipelines.step import EulerStep, StepOutput, StepPart

from .errors import DeploymentFailed, describe
from .stage_group import Call, StageGroup

BRANCH_OFFSET = {Branch.COND.value: 0, Branch.CFG_TEXT.value: 1, Branch.CFG_IMG.value: 2}


class ClusterExecutor:
    device = torch.device("cpu")

    def __init__(self, config: BagelConfig, tokenizer: BagelTokenizer, stages: StageGroup,
                 encoder, decoder, split_branches: bool | None = None):
        self.config, self.tokenizer, self.stages = config, tokenizer, stages
        self.encoder, self.decoder = encoder, decoder
        self.split_branches = stages.num_stages > 1 if split_branches is None else split_branches
        self._in_flight: dict[str, list[Call]] = {}  # image key -> its last step
        self._lock = threading.Lock()
        self._home: dict[str, int] = {}  # context id -> its branch group
        self._requests: dict[str, list[int]] = {}  # request id -> [base group, live contexts]
        self._latent_rgb: Tensor | None = None  # the decoder's preview map, asked for once

    # -- placement of contexts on branch groups ------------------------------------------------

    def _place(self, context_id: str, source: int | None = None) -> int:
        """The branch group of a context, chosen on first sight."""
        with self._lock:
            home = self._home.get(context_id)
            if home is not None:
                return home
            request, name = context_name(context_id)
            groups = self.stages.num_groups
            entry = self._requests.get(request)
            if entry is None:
                load = Counter(base for base, _ in self._requests.values())
                entry = self._requests[request] = [min(range(groups), key=lambda g: (load[g], g)), 0]
            if name in BRANCH_OFFSET:
                home = (entry[0] + min(BRANCH_OFFSET[name], groups - 1)) % groups
            else:
                home = entry[0] if source is None else source
            entry[1] += 1
            self._home[context_id] = home
            return home

    def _forget(self, context_ids: list[str]) -> None:
        with self._lock:
            for context_id in context_ids:
                if self._home.pop(context_id, None) is None:
                    continue
                request, _ = context_name(context_id)
                entry = self._requests[request]
                entry[1] -= 1
                if entry[1] == 0:
                    del self._requests[request]

    def _by_group(self, segments: list[Segment]) -> dict[int, list[int]]:
        """Segment indices per branch group, in order."""
        out: dict[int, list[int]] = {}
        for i, s in enumerate(segments):
            out.setdefault(self._place(s.context_id), []).append(i)
        return out

    # -- the executor seam -------------------------------------------------------------------

    def _run(self, segments: list[Segment]) -> list:
        """Every segment on its context's group, the groups at once; per segment outputs."""
        groups = self._by_group(segments)
        with self.stages.ordered():
            calls = [self.stages.chain(g, [segments[i] for i in idx]) for g, idx in groups.items()]
        outputs: list = [None] * len(segments)
        for idx, out in zip(groups.values(), self.stages.wait(calls)):
            for i, o in zip(idx, out):
                outputs[i] = o
        return outputs

    def prefill(self, segments: list[Segment]) -> None:
        self._run(segments)

    def decode(self, segments: list[Segment]) -> list[Tensor]:
        return self._run(segments)

    def denoise(self, segments: list[Segment], step: EulerStep) -> StepOutput:
        """Submit the step, then wait for the previous one; the final step waits for itself and
        returns the latents."""
        key, x0 = segments[0].context_id, segments[0].latents
        s = self.stages
        home = self._place(key)
        owner = s.rank(home, s.num_stages - 1)
        batches: list[tuple[int, list[Segment], tuple[Branch, ...]]] = []  # (group, segments, branches)
        for g, idx in self._by_group(segments).items():
            run = [(segments[i], step.run[i]) for i in idx]
            chunks = [[r] for r in run] if self.split_branches else [run]
            batches += [(g, [seg for seg, _ in c], tuple(b for _, b in c)) for c in chunks]
        batches.sort(key=lambda b: b[0] == home)  # the owner's group last: its state is complete then
        firsts = sorted({s.rank(g, 0) for g, _, _ in batches} - {owner})
        previous = self._in_flight.pop(key, None)
        if previous and firsts and self._in_flight:
            # Its first stages would wait for the previous step's latents at the head of their
            # queues, holding up the other images' ready work: submit it once they exist.
            s.wait(previous)
            previous = None
        with s.ordered():
            share = s.share(owner, key, firsts) if x0 is None and firsts else None
            submitted = [share] if share else []
            remote: list[tuple[StepPart, Call]] = []
            for g, segs, branches in batches:
                local = g == home
                part = StepPart(key, step, branches, x0 if local and branches[0] is Branch.COND else None)
                latents = share if share and s.rank(g, 0) != owner else None
                call = s.chain(g, segs, part, latents, None if local else owner)
                submitted.append(call)
                if not local:
                    remote.append((part, call))
            if remote:
                submitted.append(s.gather(owner, [p for p, _ in remote], [c for _, c in remote]))
        self._in_flight[key] = submitted
        if previous:
            s.wait(previous)
        if not step.final:
            return StepOutput()
        del self._in_flight[key]
        return StepOutput(x=s.wait(submitted)[-1])

    def predicted_clean(self, context_id: str) -> Callable[[], Tensor]:
        """Asked of the image's state owner (the last stage of its COND group), queued behind
        the step."""
        ref = self.stages.call_last("predicted_clean", context_id, group=self._place(context_id))
        return lambda: ray.get(ref)

    def fork(self, src: str, dst: str) -> None:
        with self._lock:
            source = self._home.get(src)
        home = self._place(dst, source)
        if source is None or source == home:  # nothing to move (an unknown source holds nothing)
            self.stages.broadcast("fork", src, dst, group=home)
            return
        with self.stages.ordered():
            calls = self.stages.move_context(source, home, src, dst)
        self.stages.wait(calls)

    def free(self, context_ids: list[str]) -> None:
        for key in context_ids:
            in_flight = self._in_flight.pop(key, None)
            if in_flight:  # the request stopped with a step queued: let it end before its memory goes
                with contextlib.suppress(Exception):  # the request is over; its own error was raised
                    self.stages.wait(in_flight)
        try:
            self.stages.broadcast("free", context_ids)
        finally:
            self._forget(context_ids)

    def live_contexts(self) -> list[str]:
        """Contexts with KV cache and images with latents on any stage."""
        return sorted({c for s in self.stages.broadcast("stats") for c in s["context_ids"] + s["latent_states"]})

    def encode_vit(self, images: list[Tensor]) -> list[Tensor]:
        return _call(self.encoder, "encoder", "encode_vit", images)

    def encode_vae(self, pixels: Tensor, noise: Tensor) -> Tensor:
        return _call(self.encoder, "encoder", "encode_vae", pixels, noise)

    def decode_latents(self, latent: Tensor) -> Tensor:
        return _call(self.decoder, "decoder", "decode", latent)

    def latent_rgb_map(self) -> Tensor:
        if self._latent_rgb is None:
            self._latent_rgb = _call(self.decoder, "decoder", "latent_rgb_map")
        return self._latent_rgb


def _call(handle, component: str, method: str, *args):
    """A call to the encoder or decoder deployment. Its failures raise `DeploymentFailed`, so
    they are told apart from a stage worker's (which rebuild the stage group)."""
    try:
        return getattr(handle, method).remote(*args).result()
    except ray.exceptions.RayError as e:
        raise DeploymentFailed(f"the {component} failed: {describe(e)}", component) from e
