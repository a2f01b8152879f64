"""Analytic mode of the simulation: an event-driven model of the service's GPUs, no Ray.

What a request does comes from the real pipelines: `trace` runs `generate_image` against
`TraceExecutor`, which records every executor call (prefills, forks, denoising steps with their
branches, ViT / VAE work) with the context lengths the KV-cache bookkeeping gives. `Model`
replays traces on a topology (replicas x CFG-parallel branch groups x stages) with the cost
model of a hardware `Profile`, scheduling as the service does:

- every GPU runs its calls one at a time in submission order, a call waiting at the head of the
  queue until its inputs exist (Ray actor order: head-of-line blocking);
- a micro-batch goes through the stages of its branch group as a chain; several stages split a
  step's CFG branches into separate micro-batches, one stage packs them into one call;
- step i+1 is submitted when step i has been submitted and step i-1 has finished (the
  orchestrator runs one step ahead); with several stages, or on a branch group other than the
  conditional one, its first stage waits for step i's latents, so while other images of the
  replica are being denoised it is submitted only once step i has finished (ClusterExecutor);
- CFG-parallel: each branch's context lives on its group (COND, text-free, image-free on groups
  0, 1, 2 modulo the group count); a context forked across groups is copied over the link; the
  velocities of the other groups go to the conditional group's last stage, which applies the step;
- replicas share nothing; a request goes to the replica with the fewest requests in flight; each
  replica has its own encoder and decoder GPU.

The host costs nothing here (Ray calls, HTTP, PNG): the Serve mode of bench/simulate.py runs the
real service and shows them as the difference.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch
from PIL import Image

from bagel_model.config import BagelConfig
from bagel_model.cost import kv_bytes_per_token
from bagel_model.hardware import Block, Profile
from bagel_model.segments import Segment, SegmentKind
from bagel_model.simulated import SimulatedKVCache
from bagel_model.stage import split_layers
from bagel_model.tokenizer import BagelTokenizer
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS, ImageParams
from pipelines.step import EulerStep, StepOutput
from pipelines.tasks import generate_image

BRANCH_ORDER = ("cond", "cfg_text", "cfg_img")  # branch group of a context: its index modulo the groups
COND_GROUP = 0  # applies each step


@dataclass(frozen=True)
class Topology:
    replicas: int = 1
    cfg_parallel: int = 1
    stages: int = 1

    @staticmethod
    def parse(text: str) -> Topology:
        """'RxCxS': replicas x CFG-parallel branch groups x stages."""
        try:
            r, c, s = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"topology must be 'replicas x cfg_parallel x stages', e.g. 1x2x3; got {text!r}") from None
        if min(r, c, s) < 1 or c > 3:
            raise ValueError(f"topology {text!r}: every count >= 1 and cfg_parallel <= 3")
        return Topology(r, c, s)

    def __str__(self) -> str:
        return f"{self.replicas}x{self.cfg_parallel}x{self.stages}"

    @property
    def gpus(self) -> int:
        """MoT-stage GPUs (encoders and decoders come on top)."""
        return self.replicas * self.cfg_parallel * self.stages


# -- traces -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TracedSegment:
    context: str  # context id ("<request>/<name><n>")
    block: Block

    @property
    def branch(self) -> str:
        name = self.context.rsplit("/", 1)[-1].rstrip("0123456789")
        return name if name in BRANCH_ORDER else "cond"  # decode forks live with their source, COND


@dataclass(frozen=True)
class Call:
    kind: str  # prefill, decode, denoise, fork, free, encode_vit, encode_vae, decode_latents
    segments: tuple[TracedSegment, ...] = ()
    final: bool = False  # denoise: the last step
    source: str = ""  # fork: source context
    target: str = ""  # fork: new context
    tokens: int = 0  # fork: cached tokens copied
    size: tuple[int, ...] = ()  # encode/decode: pixels (H, W); encode_vit: patches per image


class TraceExecutor:
    """The pipelines' executor seam, recording calls instead of running a model. Returns
    tensors of the right shapes (zeros); the KV bookkeeping gives each call's context lengths."""

    device = torch.device("cpu")

    def __init__(self, config: BagelConfig, tokenizer: BagelTokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.cache = SimulatedKVCache(range(config.llm.num_hidden_layers), kv_bytes_per_token(config.llm))
        self.calls: list[Call] = []
        self._x0: dict[str, torch.Tensor] = {}

    def _record(self, kind: str, segments: list[Segment], **extra) -> None:
        traced = tuple(TracedSegment(s.context_id, Block(s.num_tokens, self.cache.length(s.context_id), s.has_latents,
                                                         s.want_logits, s.kind is SegmentKind.NOISE)) for s in segments)
        self.calls.append(Call(kind, traced, **extra))
        for s in segments:
            if s.updates_cache:
                self.cache.append(s.context_id, s.num_tokens)

    def prefill(self, segments: list[Segment]) -> None:
        self._record("prefill", segments)

    def decode(self, segments: list[Segment]) -> list[torch.Tensor]:
        self._record("decode", segments)
        return [torch.zeros(self.config.llm.vocab_size) for _ in segments]

    def denoise(self, segments: list[Segment], step: EulerStep) -> StepOutput:
        key = segments[0].context_id
        if segments[0].latents is not None:
            self._x0[key] = segments[0].latents
        self._record("denoise", segments, final=step.final)
        return StepOutput(x=self._x0.pop(key).float()) if step.final else StepOutput()

    def fork(self, src: str, dst: str) -> None:
        self.calls.append(Call("fork", source=src, target=dst, tokens=self.cache.length(src)))
        self.cache.fork(src, dst)

    def free(self, context_ids: list[str]) -> None:
        self.calls.append(Call("free"))
        self.cache.free(context_ids)

    def live_contexts(self) -> list[str]:
        return self.cache.context_ids()

    def encode_vit(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        p = self.config.vit.patch_size
        lengths = tuple((img.shape[-2] // p) * (img.shape[-1] // p) for img in images)
        self.calls.append(Call("encode_vit", size=lengths))
        return [torch.zeros(n, 1) for n in lengths]

    def encode_vae(self, pixels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.calls.append(Call("encode_vae", size=tuple(pixels.shape[-2:])))
        return torch.zeros(1, self.config.vae.z_channels, *noise.shape[-2:])

    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        f = self.config.vae.downsample
        size = (latent.shape[-2] * f, latent.shape[-1] * f)
        self.calls.append(Call("decode_latents", size=size))
        return torch.zeros(1, 3, *size)


EDIT_PROMPT = "make it night"
T2I_PROMPT = "a red fox in the snow"


def trace(config: BagelConfig, tokenizer: BagelTokenizer, task: str, size: int, steps: int = 50) -> list[Call]:
    """The executor calls of one request: 't2i' (size x size) or 'edit' (a size x size input)."""
    executor = TraceExecutor(config, tokenizer)
    if task == "t2i":
        items, params = [T2I_PROMPT], ImageParams(num_timesteps=steps, height=size, width=size)
    elif task == "edit":
        items = [Image.new("RGB", (size, size), (128, 96, 64)), EDIT_PROMPT]
        params = ImageParams(**{**EDIT_DEFAULTS.__dict__, "num_timesteps": steps})
    else:
        raise ValueError(f"task must be t2i or edit, got {task!r}")
    generate_image(executor, items, params, noise=NoiseSource(0), request_id="r")
    if executor.cache.context_ids():
        raise AssertionError(f"the trace leaked contexts: {executor.cache.context_ids()}")
    return executor.calls


# -- a small discrete-event kernel ---------------------------------------------------------------

class Env:
    def __init__(self):
        self.now = 0.0
        self._queue: list = []
        self._order = itertools.count()

    def at(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (self.now + delay, next(self._order), fn))

    def run(self) -> None:
        while self._queue:
            self.now, _, fn = heapq.heappop(self._queue)
            fn()


class Event:
    def __init__(self, env: Env):
        self.env, self.done, self._waiting = env, False, []

    def succeed(self) -> None:
        self.done = True
        waiting, self._waiting = self._waiting, []
        for fn in waiting:
            fn()

    def then(self, fn: Callable[[], None]) -> None:
        if self.done:
            fn()
        else:
            self._waiting.append(fn)


def all_of(env: Env, events: list[Event]) -> Event:
    joined, pending = Event(env), [e for e in events if not e.done]
    if not pending:
        joined.succeed()
    count = [len(pending)]

    def one() -> None:
        count[0] -= 1
        if count[0] == 0:
            joined.succeed()

    for e in pending:
        e.then(one)
    return joined


def delay(env: Env, seconds: float) -> Event:
    event = Event(env)
    env.at(seconds, event.succeed)
    return event


def start(env: Env, process: Generator[Event, None, None]) -> Event:
    """Run a generator that yields events to wait for; the returned event marks its end."""
    finished = Event(env)

    def step() -> None:
        try:
            event = next(process)
        except StopIteration:
            finished.succeed()
            return
        event.then(step)

    step()
    return finished


@dataclass
class Task:
    duration: float
    link: float  # of which stage-to-stage transfer
    after: list[Event]
    done: Event


class Device:
    """One GPU. Policy "fifo": calls run one at a time in submission order, the head of the queue
    waiting for its inputs (Ray actor order, what the service does); "ready": the oldest call
    whose inputs exist runs first (a what-if for a stage-side scheduler)."""

    def __init__(self, env: Env, name: str, policy: str = "fifo"):
        if policy not in ("fifo", "ready"):
            raise ValueError(f"policy must be fifo or ready, got {policy!r}")
        self.env, self.name, self.policy = env, name, policy
        self._queue: list[Task] = []
        self._running = False
        self._idle_since: float | None = None  # since when calls are queued but none can start
        self.busy_s = self.link_s = 0.0
        self.blocked_s = 0.0  # idle while queued calls waited for their inputs

    def submit(self, duration: float, after: list[Event], link: float = 0.0) -> Event:
        task = Task(duration, link, after, Event(self.env))
        self._queue.append(task)
        all_of(self.env, after).then(self._next)
        self._next()
        return task.done

    def _startable(self) -> Task | None:
        for task in self._queue[:1] if self.policy == "fifo" else self._queue:
            if all(e.done for e in task.after):
                return task
        return None

    def _next(self) -> None:
        if self._running or not self._queue:
            return
        task = self._startable()
        if task is None:
            if self._idle_since is None:
                self._idle_since = self.env.now
            return
        if self._idle_since is not None:
            self.blocked_s += self.env.now - self._idle_since
            self._idle_since = None
        self._queue.remove(task)
        self._running = True
        self.busy_s += task.duration
        self.link_s += task.link

        def finish() -> None:
            self._running = False
            task.done.succeed()
            self._next()

        self.env.at(task.duration, finish)


# -- the model ---------------------------------------------------------------------------------

@dataclass
class Replica:
    stages: list[list[Device]]  # [branch group][stage]
    encoder: Device
    decoder: Device
    in_flight: int = 0
    denoising: int = 0  # images between their first and final step


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    makespan: float = 0.0
    devices: list[Device] = field(default_factory=list)


class Model:
    def __init__(self, config: BagelConfig, profile: Profile, topology: Topology, policy: str = "fifo"):
        """`policy`: the stages' order of work (`Device`)."""
        self.config, self.profile, self.topology, self.policy = config, profile, topology, policy
        self.llm = config.llm
        self.specs = split_layers(self.llm.num_hidden_layers, topology.stages)
        self.split = topology.stages > 1  # ClusterExecutor's default split_branches

    def group_of(self, segment: TracedSegment) -> int:
        return BRANCH_ORDER.index(segment.branch) % self.topology.cfg_parallel

    def stage_s(self, blocks: list[Block], s: int) -> tuple[float, float]:
        """(seconds, of which link) of a micro-batch on stage s, as `SimulatedRunner.run` charges it."""
        spec, p = self.specs[s], self.profile
        compute = p.forward_s(self.llm, blocks, len(spec.layers), spec.is_last)
        copy = p.link.copy_s(p.hidden_bytes(self.llm, sum(b.tokens for b in blocks)))
        link = 0.0 if spec.is_first else p.link.latency_s + copy
        if not spec.is_last:
            link += (p.link.copies - 1) * copy
        return compute + link, link

    def chain(self, replica: Replica, group: int, blocks: list[Block], after: list[Event],
              last_extra: float = 0.0) -> Event:
        """A micro-batch through a group's stages; `last_extra`: link seconds added on its last stage."""
        done = None
        for s, device in enumerate(replica.stages[group]):
            seconds, link = self.stage_s(blocks, s)
            if s == len(self.specs) - 1:
                seconds, link = seconds + last_extra, link + last_extra
            done = device.submit(seconds, after if s == 0 else [done], link)
        return done

    def run(self, traces: dict[str, list[Call]], tasks: list[str], concurrency: int) -> Result:
        """Closed loop: `concurrency` clients send the `tasks` in order, one request at a time each."""
        env = Env()
        t = self.topology
        replicas = [Replica([[Device(env, f"r{r}g{g}s{s}", self.policy) for s in range(t.stages)]
                             for g in range(t.cfg_parallel)],
                            Device(env, f"r{r}-encoder"), Device(env, f"r{r}-decoder")) for r in range(t.replicas)]
        result = Result(devices=[d for r in replicas for group in r.stages for d in group] +
                        [d for r in replicas for d in (r.encoder, r.decoder)])
        todo = deque(tasks)

        def client() -> Generator[Event, None, None]:
            while todo:
                task = todo.popleft()
                replica = min(replicas, key=lambda r: r.in_flight)
                replica.in_flight += 1
                begin = env.now
                yield start(env, self.request(env, replica, traces[task]))
                replica.in_flight -= 1
                result.latencies.append(env.now - begin)
                result.ends.append(env.now)

        for _ in range(concurrency):
            start(env, client())
        env.run()
        result.makespan = env.now
        return result

    def request(self, env: Env, replica: Replica, calls: list[Call]) -> Generator[Event, None, None]:
        p, config, llm = self.profile, self.config, self.llm
        previous: Event | None = None  # the last submitted denoising step
        for call in calls:
            if call.kind in ("prefill", "decode"):
                by_group: dict[int, list[Block]] = {}
                for seg in call.segments:
                    by_group.setdefault(self.group_of(seg), []).append(seg.block)
                yield all_of(env, [self.chain(replica, g, blocks, []) for g, blocks in by_group.items()])
            elif call.kind == "fork":
                src, dst = (self.group_of(TracedSegment(c, Block(0))) for c in (call.source, call.target))
                if src != dst and call.tokens:  # copy the context's KV cache to the other group, stage by stage
                    copies = [p.link.seconds(call.tokens * kv_bytes_per_token(llm, p.dtype_bytes, len(spec.layers)))
                              for spec in self.specs]
                    yield all_of(env, [device.submit(seconds, [], seconds)
                                       for device, seconds in zip(replica.stages[dst], copies)])
            elif call.kind == "encode_vit":
                yield replica.encoder.submit(p.vit_s(config, list(call.size)), [])
            elif call.kind == "encode_vae":
                yield replica.encoder.submit(p.vae_encode_s(config, *call.size), [])
            elif call.kind == "decode_latents":
                yield replica.decoder.submit(p.vae_decode_s(config, *call.size), [])
            elif call.kind == "denoise":
                if previous is None:
                    replica.denoising += 1
                elif self.waits_for_latents(call) and replica.denoising > 1:
                    yield previous
                    previous = None
                step = self.step(env, replica, call, previous)
                if previous is not None:
                    yield previous
                previous = step
                if call.final:
                    yield step
                    previous = None
                    replica.denoising -= 1

    def waits_for_latents(self, call: Call) -> bool:
        """Whether a (non-first) step's first stages wait for the previous step's latents."""
        return self.split or any(self.group_of(seg) != COND_GROUP for seg in call.segments)

    def step(self, env: Env, replica: Replica, call: Call, previous: Event | None) -> Event:
        """Submit one denoising step; the returned event: its latents are updated. One group of
        one stage keeps the latents in the stage and applies the step within the call, so its
        queue order suffices; otherwise a step's first stages wait for the previous step."""
        p = self.profile
        grid = call.segments[0].block.tokens - 2
        latent_bytes = grid * self.config.patch_latent_dim * p.dtype_bytes
        done = []
        by_group: dict[int, list[Block]] = {}
        for seg in call.segments:
            by_group.setdefault(self.group_of(seg), []).append(seg.block)
        for g, blocks in by_group.items():
            after = [previous] if previous is not None and (self.split or g != COND_GROUP) else []
            extra = 0.0 if g == COND_GROUP else p.link.seconds(latent_bytes)  # velocities to the COND group
            for batch in ([[b] for b in blocks] if self.split else [blocks]):
                done.append(self.chain(replica, g, batch, after, extra))
        return all_of(env, done)


def steady_throughput(ends: list[float], concurrency: int) -> float | None:
    """Requests per second of a closed loop once it is full: the completions after the first
    `concurrency` over the time from the `concurrency`-th completion to the last (exact when
    requests finish in waves of `concurrency`); None with too few requests."""
    ends = sorted(ends)
    if len(ends) <= concurrency or ends[-1] <= ends[concurrency - 1]:
        return None
    return (len(ends) - concurrency) / (ends[-1] - ends[concurrency - 1])


def summarize(result: Result, concurrency: int) -> dict:
    """Latency, steady throughput and where the devices' time went."""
    lat = sorted(result.latencies)
    steady = steady_throughput(result.ends, concurrency) or len(lat) / result.makespan
    stages = [d for d in result.devices if "coder" not in d.name]
    return {
        "requests": len(lat), "latency_s": {"p50": lat[len(lat) // 2], "mean": sum(lat) / len(lat), "max": lat[-1]},
        "throughput_per_min": 60 * steady, "makespan_s": result.makespan,
        "stage_busy_fraction": {d.name: d.busy_s / result.makespan for d in stages},
        "stage_link_fraction": {d.name: d.link_s / result.makespan for d in stages},
        "stage_blocked_fraction": {d.name: d.blocked_s / result.makespan for d in stages},
        "encoder_decoder_busy_fraction": {d.name: d.busy_s / result.makespan for d in result.devices
                                          if "coder" in d.name},
    }
