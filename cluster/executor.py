"""`ClusterExecutor`: the pipelines' executor seam over one replica's stage workers.

LLM work goes through the `StageGroup` (hidden states stage to stage, device to device); image
encoding and decoding go to the encoder and decoder deployments. Logits come back on the CPU.

Branch groups (CFG-parallel): every context lives on one branch group, chosen when it first
appears. A request's COND context goes to the group with the fewest requests based there, its
text-free context to the next group and its image-free context to the one after (as far as
there are groups); other contexts (a decode fork, a prefix cache entry) stay with their source.
Prefills and decodes
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

Steps of concurrent requests are batched (pipelines/batching.py): the `StepBatcher` hands
`_denoise_batch` the steps of several images, whose micro-batches on the same branch group (and,
split, the same branch slot) go as one, a `StepPart` per image; each image keeps its state
owner, which collects its velocities as above.
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
from pipelines.batching import BATCH_WAIT_S, MAX_BATCH_TOKENS, StepBatcher, StepCall
from pipelines.context import context_name
from pipelines.guidance import Branch
from pipelines.prefix_cache import CACHE_REQUEST, PrefixCache
from pipelines.step import EulerStep, StepOutput, StepPart

from .errors import DeploymentFailed, describe
from .stage_group import Call, StageGroup
from .stage_worker import StepReply

BRANCH_OFFSET = {Branch.COND.value: 0, Branch.CFG_TEXT.value: 1, Branch.CFG_IMG.value: 2}


class ClusterExecutor:
    device = torch.device("cpu")

    def __init__(self, config: BagelConfig, tokenizer: BagelTokenizer, stages: StageGroup,
                 encoder, decoder, split_branches: bool | None = None, max_batch_tokens: int = MAX_BATCH_TOKENS,
                 batch_wait_s: float = BATCH_WAIT_S, on_forward: Callable[[int], None] | None = None):
        """`max_batch_tokens`, `batch_wait_s`, `on_forward`: the `StepBatcher`'s (0 tokens: each
        step runs alone)."""
        self.config, self.tokenizer, self.stages = config, tokenizer, stages
        self.prefix_cache: PrefixCache | None = None  # set by the service once the stages are warm
        self.encoder, self.decoder = encoder, decoder
        self.split_branches = stages.num_stages > 1 if split_branches is None else split_branches
        self.batcher = StepBatcher(self._denoise_batch, max_batch_tokens, batch_wait_s, on_forward) \
            if max_batch_tokens else None
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
                load = Counter(base for r, (base, _) in self._requests.items() if r != CACHE_REQUEST)
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
        if self.batcher is not None:
            return self.batcher.denoise(segments, step)
        return self._denoise_batch([StepCall(segments, step)])[0]

    def _denoise_batch(self, calls: list[StepCall]) -> list[StepOutput]:
        """The steps of several images (distinct keys), submitted as shared micro-batches."""
        s, last = self.stages, self.stages.num_stages - 1
        # (group, branch slot) -> [(image, its segments there, their StepPart, state owner if remote)]
        batches: dict[tuple[int, int], list[tuple[str, list[Segment], StepPart, int | None]]] = {}
        owners, firsts = {}, {}
        for call in calls:
            key, step, segments = call.key, call.step, call.segments
            home = self._place(key)
            owners[key] = owner = s.rank(home, last)
            groups = self._by_group(segments)
            firsts[key] = sorted({s.rank(g, 0) for g in groups} - {owner})
            for g, idx in groups.items():
                run = [(segments[i], step.run[i]) for i in idx]
                for slot, chunk in enumerate([[r] for r in run] if self.split_branches else [run]):
                    local = g == home
                    branches = tuple(b for _, b in chunk)
                    x0 = segments[0].latents if local and branches[0] is Branch.COND else None
                    batches.setdefault((g, slot), []).append(
                        (key, [seg for seg, _ in chunk], StepPart(key, step, branches, x0), None if local else owner))
        # The owners' own micro-batches last: their states are complete then.
        order = sorted(batches, key=lambda gs: sum(owner is None for *_, owner in batches[gs]))
        previous = {id(c): c for call in calls for c in self._in_flight.pop(call.key, [])}
        if previous and any(firsts.values()) and self._in_flight:
            # Their first stages would wait for the previous step's latents at the head of their
            # queues, holding up the other images' ready work: submit once those exist.
            s.wait(list(previous.values()))
            previous = {}
        submitted: dict[str, list[Call]] = {call.key: [] for call in calls}
        with s.ordered():
            shares = {}
            for call in calls:
                if call.segments[0].latents is None and firsts[call.key]:
                    shares[call.key] = s.share(owners[call.key], call.key, firsts[call.key])
                    submitted[call.key].append(shares[call.key])
            remote: dict[int, list[tuple[list[StepPart], Call]]] = {}  # owner -> its parts in other chains
            for g, slot in order:
                entries = batches[(g, slot)]
                chain = s.chain(g, [seg for _, segs, _, _ in entries for seg in segs], [e[2] for e in entries],
                                [shares.get(key) if s.rank(g, 0) != owners[key] else None for key, *_ in entries],
                                [owner for *_, owner in entries])
                for key, _, _, _ in entries:
                    submitted[key].append(chain)
                for owner in dict.fromkeys(o for *_, o in entries if o is not None):
                    remote.setdefault(owner, []).append(([p for _, _, p, o in entries if o == owner], chain))
            for owner, chains in remote.items():
                gather = s.gather(owner, [parts for parts, _ in chains], [c for _, c in chains])
                for key in {p.key for parts, _ in chains for p in parts}:
                    submitted[key].append(gather)
        self._in_flight.update(submitted)
        if previous:
            s.wait(list(previous.values()))
        outputs = []
        for call in calls:
            if not call.step.final:
                outputs.append(StepOutput())
                continue
            del self._in_flight[call.key]
            x = next(r.done[call.key] for r in s.wait(submitted[call.key])
                     if isinstance(r, StepReply) and call.key in r.done)
            outputs.append(StepOutput(x=x))
        return outputs

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

    def drop_prefix_cache(self) -> None:
        """The stage group was replaced: the cache's entries went with the old one. Forget
        their placement (no call to the new stages) and the cache."""
        if self.prefix_cache is not None:
            self._forget(self.prefix_cache.context_ids())
            self.prefix_cache = None

    def free(self, context_ids: list[str]) -> None:
        if self.batcher is not None:
            self.batcher.forget(context_ids)
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
        """Contexts with KV cache and images with latents on any stage (the stages report the
        prefix cache's contexts apart; the cache names its own)."""
        cached = self.prefix_cache.context_ids() if self.prefix_cache is not None else []
        return sorted({c for s in self.stages.broadcast("stats") for c in s["context_ids"] + s["latent_states"]}
                      | set(cached))

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
