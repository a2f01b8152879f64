"""`BagelService`: the request lifecycle behind the HTTP routes and the Ray handle methods.

It owns the pipeline's stage group (through a `StageSupervisor`, which builds and warms it up in
the background when the replica starts, and replaces it when a stage worker dies) and runs the
`pipelines/` algorithms through a `ClusterExecutor`, one worker thread per request in flight (a
`Job`). Until the stage group is warm, requests get 503 and `/health` says `starting`. Requests
beyond `max_concurrent_requests` wait in a bounded queue; beyond that they get `Overloaded`. A
cancelled request stops at its next step; its contexts are freed on every stage whatever way it
ends. The encoder's or decoder's failures are theirs alone (`DeploymentWatch`): Serve restarts
that deployment and only requests that need it are refused meanwhile. Each request is logged
through the `ray.serve` logger with its id (Serve's, which the client sees as `x-request-id`):
admitted or refused, then finished (outcome, latency, time per phase) or failed (error).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import ray
from PIL import Image

from bagel_model.config import BagelConfig
from bagel_model.cost import kv_bytes_per_token
from bagel_model.demo import DEMO_LABEL, checkpoint_or_demo, is_demo_checkpoint
from bagel_model.errors import BagelError, InvalidRequest
from bagel_model.simulated import Simulation
from bagel_model.tokenizer import BagelTokenizer
from pipelines.noise import NoiseSource, random_seed
from pipelines.prefix_cache import PrefixCache
from pipelines.previews import Preview, PreviewRenderer
from pipelines.tasks import generate_image, understand

from .admission import Admission, kv_bytes_estimate
from .api import ImageOutput, ImageTask, TextOutput, TextTask
from .args import AppArgs, approximate_modes
from .deployments import DeploymentWatch
from .devices import placed_device, resolve_dtype
from .errors import Cancelled, DeploymentFailed, StageFailed, Unavailable, describe, outcome_of
from .executor import ClusterExecutor
from .image_encoding import encode_image
from .image_store import ImageStore, StoreClient
from .inputs import checked_items, decoded, decoded_bytes
from .jobs import Job, cancel_all
from .metrics import PREFIX_CACHE_STATS, Metrics
from .phases import TimedExecutor, server_timing, timed
from .routing import RecentKeys, affinity_keys
from .stage_group import StageGroup
from .supervisor import StageSupervisor
from .warmup import warm_up, warmup_sizes

log = logging.getLogger("ray.serve")


class BagelService:
    def __init__(self, args: AppArgs, encoder, decoder, make_stages: Callable[[], StageGroup] | None = None,
                 image_store=None, replica: int | None = None):
        """Loads the configuration and tokenizer (a bad checkpoint fails here), then builds the
        stage group in the background. `make_stages` builds the group (default: from `args`;
        tests inject their own); `image_store`: the application's `ImageStoreDeployment`
        (default: a store in this process); `replica`: this replica's index among the
        deployment's (for /health)."""
        self.args, self.limits, self.replica = args, args.limits, replica
        self.checkpoint = str(checkpoint_or_demo(args.checkpoint_dir))
        self.is_demo = is_demo_checkpoint(self.checkpoint)
        self.model_name = args.model_name or ("bagel-demo" if self.is_demo else Path(self.checkpoint).name)
        self.config = BagelConfig.from_checkpoint_dir(self.checkpoint)
        self.tokenizer = BagelTokenizer.from_dir(self.checkpoint)
        self.device = placed_device(args.device, args.gpus_per_stage)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.simulation = Simulation.named(args.simulate, args.simulate_time_scale) if args.simulate else None
        self.encoder, self.decoder = encoder, decoder
        self.executor: ClusterExecutor | None = None  # once the first stage group is built
        self.deployments = DeploymentWatch({"encoder": encoder, "decoder": decoder}, args.retry_after_s)
        self.pool = ThreadPoolExecutor(args.max_concurrent_requests, thread_name_prefix="request")
        self.preview_pool = ThreadPoolExecutor(args.max_concurrent_requests, thread_name_prefix="preview")
        self.affinity = RecentKeys()  # keys of recent requests, reported to the router (cluster/routing.py)
        self.image_store = StoreClient(image_store or ImageStore(args.image_url_store_bytes,
                                                                 args.image_url_store_images, args.image_url_ttl_s))
        self.admission = Admission(args.max_concurrent_requests, args.max_queued_requests,
                                   args.kv_cache_bytes, args.retry_after_s, args.image_memory_bytes)
        self.running = 0  # requests on a worker thread
        self._running_lock = threading.Lock()
        self.completed = 0
        self.starting = "building the stage workers"  # what the start is doing, for /health
        self.warmup_s: dict[str, float] = {}
        self.supervisor = StageSupervisor(make_stages or self._make_stages, max_tries=args.stage_rebuild_tries,
                                          backoff_s=args.stage_rebuild_backoff_s, on_replaced=self._use_stages,
                                          warm_up=self._warm_up)
        self.metrics = Metrics(_replica_id(), {
            "requests_in_system": lambda: self.admission.in_system, "requests_running": lambda: self.running,
            "kv_reserved_bytes": lambda: self.admission.kv_reserved,
            "ready": lambda: float(self.supervisor.state == "ok" and not self.deployments.down),
            "stage_group_rebuilds": lambda: self.supervisor.rebuilds,
            "deployment_failures": lambda: self.deployments.failures,
            **{f"prefix_cache_{name}": (lambda name=name: self._prefix_cache_stats().get(name, 0))
               for name in PREFIX_CACHE_STATS}})
        self.supervisor.start()

    @property
    def stages(self) -> StageGroup | None:
        return self.supervisor.group

    def _make_stages(self) -> StageGroup:
        a = self.args
        return StageGroup(self.checkpoint, self.config.llm.num_hidden_layers, a.num_stages,
                          branch_groups=a.cfg_parallel, replica=self.replica, device=self.device, dtype=self.dtype,
                          gpus_per_stage=a.gpus_per_stage, memory_fraction=a.stage_memory_fraction,
                          transport=a.transport, layer_sizes=a.layer_sizes, random_weights=a.random_weights,
                          compile=a.compile, fp8=a.fp8, quantize=a.quantize,
                          simulation=self.simulation)

    def _use_stages(self, group: StageGroup) -> None:
        if self.executor is None:
            self.executor = ClusterExecutor(self.config, self.tokenizer, group, self.encoder, self.decoder,
                                            self.args.split_branches, self.args.max_batch_tokens,
                                            self.args.batch_wait_s, self.metrics.forward)
        else:
            self.executor.stages = group
        self.executor.drop_prefix_cache()  # the old group's entries went with it; a new cache once warm
        self.affinity = RecentKeys()  # and the router should not send their sessions here for them

    def _new_prefix_cache(self) -> PrefixCache | None:
        if not self.args.prefix_cache:
            return None
        layers = max(len(s.layers) for s in self.stages.specs)
        return PrefixCache(self.executor, self.args.prefix_cache_bytes,
                           kv_bytes_per_token(self.config.llm, self.dtype.itemsize, layers))

    def _prefix_cache_stats(self) -> dict:
        cache = self.executor.prefix_cache if self.executor is not None else None
        return cache.stats() if cache is not None else {}

    def _warm_up(self) -> None:
        """Run the warm-up requests on the new stage group (supervisor thread)."""
        def progress(what: str) -> None:
            self.starting = f"warming up: {what}"

        sizes = warmup_sizes(self.args.warmup, self.config, self.device == "cuda")
        self.warmup_s = warm_up(self.executor, self.args.warmup, sizes, progress)
        self.executor.prefix_cache = self._new_prefix_cache()  # after the warm-up: its prompts are not kept
        self.starting = "ready"

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, task: ImageTask) -> ImageOutput:
        """Generate one image (text-to-image, editing, interleaved inputs)."""
        [job] = await self.start_images(task, 1)
        return await job.result()

    async def understand(self, task: TextTask) -> TextOutput:
        """Answer about text and images."""
        return await (await self.start_text(task)).result()

    async def start_images(self, task: ImageTask, n: int) -> list[Job]:
        """Check the parameters, then admit and queue `n` images (seeds seed, seed + 1, ...).
        Raises before any work starts, also for a request that will be streamed."""
        task.params.validate(self.config.max_image_side, self.config.latent_downsample)
        task.text_params.validate()
        return self._start_all("image", self._image_work, task, n)

    async def start_text(self, task: TextTask) -> Job:
        [job] = await self.start_texts(task, 1)
        return job

    async def start_texts(self, task: TextTask, n: int) -> list[Job]:
        """Check the parameters, then admit and queue `n` answers (seeds seed, seed + 1, ...)."""
        task.params.validate(self.limits.max_new_tokens)
        return self._start_all("text", self._text_work, task, n)

    def _start_all(self, kind: str, work: Callable, task: ImageTask | TextTask, n: int) -> list[Job]:
        if self.args.prefix_cache:
            work = self._recording_affinity(work, _session_id())
        task = replace(task, items=checked_items(task.items, self.limits))
        request_id = _request_id()
        jobs: list[Job] = []
        try:
            for i in range(n):
                jobs.append(self._start(kind, work, _with_seed(task, i), request_id if n == 1 else f"{request_id}.{i}"))
        except BaseException:
            cancel_all(jobs)
            raise
        return jobs

    def _recording_affinity(self, work: Callable, session_id: str) -> Callable:
        """`work`, recording first (on the worker thread: it hashes the images) the request's keys
        for the prefix-affinity router (cluster/routing.py)."""
        def run(task, job):
            self.affinity.add(affinity_keys(session_id, [task]))
            return work(task, job)
        return run

    def _start(self, kind: str, work: Callable, task: ImageTask | TextTask, request_id: str) -> Job:
        """Admit the request, or raise at once (503 while the workers it needs are not there, 429
        when the queue is full, 400 when it could never fit); then start its lifecycle. Its items
        have passed `checked_items`: images are still encoded, and decoded on the worker thread
        within the memory admission reserves for them."""
        try:
            self._check_available(kind, task)
            layers = max(len(s.layers) for s in self.stages.specs)
            kv_bytes = kv_bytes_estimate(task, self.config, self.tokenizer, layers, self.dtype.itemsize,
                                         self.limits.max_prompt_tokens)
            image_bytes = decoded_bytes(task.items)
            self.admission.enter(kv_bytes, image_bytes)
        except BagelError as e:
            log.info("request %s (%s) refused: %s", request_id, kind, describe(e))
            self.metrics.refused(kind, outcome_of(e))
            raise
        job = Job(request_id, self.args.request_timeout_s, self.args.sse_keepalive_s)
        log.info("request %s (%s) admitted: %d in the system, ~%d KV bytes per stage", request_id, kind,
                 self.admission.in_system, kv_bytes)
        job.start(self._lifecycle(job, kind, work, task, kv_bytes, image_bytes))
        return job

    def _check_available(self, kind: str, task: ImageTask | TextTask) -> None:
        retry = self.args.retry_after_s
        state = self.supervisor.state
        if state == "starting":
            raise Unavailable(f"the service is starting ({self.starting}); retry shortly", retry_after_s=retry)
        if state == "restarting":
            raise StageFailed("the MoT stage workers are restarting after a failure; retry shortly",
                              retry_after_s=retry)
        if state == "failed":
            raise StageFailed(f"{self.supervisor.error}; this replica is being replaced", retry_after_s=retry)
        needs = {"decoder"} if kind == "image" else set()
        if any(not isinstance(item, str) for item in task.items):
            needs.add("encoder")
        self.deployments.check(needs)

    async def _lifecycle(self, job: Job, kind: str, work: Callable, task, kv_bytes: int, image_bytes: int):
        """The admitted request: wait for KV-cache and image-memory room, run on a worker
        thread, then account for it, however it ended."""
        reserved, error = False, None
        try:
            await self.admission.reserve(kv_bytes, image_bytes, job.cancelled)
            reserved = True
            return await asyncio.wrap_future(self.pool.submit(self._run, job, work, task))
        except BaseException as e:
            error = e
            raise
        finally:
            self.admission.leave(kv_bytes, image_bytes) if reserved else self.admission.leave()
            latency_s = time.monotonic() - job.created
            self.completed += 1
            self.metrics.finished(kind, outcome_of(error), latency_s, job.phases, job.first_event_s)
            _log_end(job, kind, latency_s, error)

    def _run(self, job: Job, work: Callable, task):
        """The request on its worker thread, from leaving the queue to its result."""
        with self._running_lock:
            self.running += 1
        try:
            job.phases["queue"] = time.monotonic() - job.created
            job.emit({"type": "started", "queue_s": job.phases["queue"]})
            return work(task, job)
        except DeploymentFailed as e:  # the encoder or decoder: Serve restarts it, the stages stay
            self.deployments.failed(e)
            e.retry_after_s = self.args.retry_after_s
            raise
        except ray.exceptions.RayError as e:  # a stage worker
            self.supervisor.stage_failed(e)
            raise StageFailed(f"a worker failed: {describe(e)}", retry_after_s=self.args.retry_after_s) from None
        finally:
            with self._running_lock:
                self.running -= 1

    def _image_work(self, task: ImageTask, job: Job) -> ImageOutput:
        seed = task.seed if task.seed is not None else random_seed()
        previews = self._preview_renderer(task, job) if task.previews else None
        try:
            result = generate_image(
                TimedExecutor(self.executor, job.phases), decoded(task.items), task.params, think=task.think,
                text_params=task.text_params, noise=NoiseSource(seed), negative_prompt=task.negative_prompt,
                on_step=lambda p: job.emit({"type": "progress", "step": p.step, "num_steps": p.num_steps}),
                on_text=lambda delta: job.emit({"type": "thought", "delta": delta}),
                previews=task.previews, on_preview=previews,
            )
            with timed(job.phases, "encode_output"):
                data = encode_image(result.image, task.output)
            if previews is not None:
                previews.wait()  # every preview is sent before the image
        except BaseException:
            if previews is not None:
                previews.cancel()
            raise
        thought = result.thought
        return ImageOutput(data, result.image.width, result.image.height, seed, thought.text if thought else None,
                           task.output.format, prompt_tokens=result.prompt_tokens,
                           prompt_image_tokens=result.prompt_image_tokens, cached_tokens=result.cached_tokens,
                           output_tokens=result.image_tokens + (len(thought.token_ids) if thought else 0))

    def _preview_renderer(self, task: ImageTask, job: Job) -> PreviewRenderer:
        """Previews rendered on the preview threads, sent as `partial_image` events in the
        image's output format."""
        def send(preview: Preview, image: Image.Image) -> None:
            job.emit({"type": "partial_image", "partial_image_index": preview.index, "step": preview.step,
                      "num_steps": preview.num_steps, "width": preview.width, "height": preview.height,
                      "b64_json": base64.b64encode(encode_image(image, task.output)).decode()})

        return PreviewRenderer(self.executor, self.args.preview_decoder, self.preview_pool, send)

    def _text_work(self, task: TextTask, job: Job) -> TextOutput:
        result = understand(TimedExecutor(self.executor, job.phases), decoded(task.items), task.params,
                            think=task.think, seed=task.seed,
                            on_text=lambda delta: job.emit({"type": "text", "delta": delta}))
        return TextOutput(result.text, len(result.token_ids), result.finish_reason, result.prompt_tokens,
                          result.cached_tokens)

    # -- state ------------------------------------------------------------------------------

    async def stats(self) -> dict:
        stages = await asyncio.to_thread(self.stages.broadcast, "stats")
        self.metrics.stage_stats(stages)
        return {"replica": self.replica, "topology": str(self.args.topology), "links": self.stages.links,
                "requests_in_system": self.admission.in_system, "requests_completed": self.completed,
                "kv_reserved_bytes": self.admission.kv_reserved, "image_reserved_bytes": self.admission.image_reserved,
                "prefix_cache": self._prefix_cache_stats() or None, "stages": stages}

    async def health(self) -> tuple[int, dict]:
        """(HTTP status, body): 200 "ok" with every stage worker's stats (its replica, branch
        group, stage and pid among them); 503 "starting" until the stage workers are built and
        warm; 503 "degraded" while a worker is unreachable or being replaced; 503 "failed" once
        the stage workers cannot be rebuilt. Never waits for a worker that is not there."""
        base = {"model": self.model_name, "replica": self.replica, "demo": self.is_demo,
                "notice": DEMO_LABEL if self.is_demo else None, "quantize": self.args.quantize,
                "approximate": approximate_modes(self.args), "simulated": self.args.simulate}
        state = self.supervisor.state
        if state == "starting":
            return 503, {**base, "status": "starting", "detail": self.starting}
        if state == "failed":
            return 503, {**base, "status": "failed", "error": self.supervisor.error}
        if state == "restarting":
            return 503, {**base, "status": "degraded", "error": "stage workers restarting"}
        try:
            stats = await asyncio.wait_for(self.stats(), timeout=10)
        except Exception as e:  # a dead or hung worker makes the service degraded until replaced
            if isinstance(e, ray.exceptions.RayError):
                self.supervisor.stage_failed(e)
            return 503, {**base, "status": "degraded", "error": f"{type(e).__name__}: {e}"}
        body = {**base, "warmup_s": self.warmup_s, **stats}
        if self.deployments.down:
            return 503, {**body, "status": "degraded", "error": self.deployments.status()}
        return 200, {**body, "status": "ok"}

    def check_health(self) -> None:
        """Raises once the stage workers cannot be (re)built, so that Serve replaces the replica.
        Starting is healthy: the replica is building and warming up its workers."""
        if self.supervisor.state == "failed":
            raise StageFailed(self.supervisor.error)

    async def metrics_text(self) -> bytes:
        """Prometheus text, with the stage gauges refreshed when the stages answer."""
        if self.supervisor.state == "ok":
            try:
                await asyncio.wait_for(self.stats(), timeout=10)
            except Exception:  # the gauges keep their last values; /health reports the failure
                pass
        return self.metrics.text()


def _with_seed(task: ImageTask | TextTask, index: int) -> ImageTask | TextTask:
    return replace(task, seed=task.seed + index) if task.seed is not None and index else task


def _request_id() -> str:
    """Serve's id of the current request (the client's X-Request-ID, or one the proxy made;
    either way the response's x-request-id), so that logs and clients name requests alike; a
    fresh one outside a Serve request."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or secrets.token_hex(12)


def _session_id() -> str:
    """Serve's session of the current request (the X-Session-ID header), if any."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().session_id


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_tag
    except Exception:  # not in a Serve replica (tests): the process
        return f"pid{os.getpid()}"


def _log_end(job: Job, kind: str, latency_s: float, error: BaseException | None) -> None:
    phases = server_timing(job.phases)
    if error is None:
        log.info("request %s (%s) finished: ok in %.2f s (%s)", job.request_id, kind, latency_s, phases)
    elif isinstance(error, (Cancelled, InvalidRequest)):
        log.info("request %s (%s) ended after %.2f s: %s", job.request_id, kind, latency_s, describe(error))
    else:
        log.warning("request %s (%s) failed after %.2f s: %s", job.request_id, kind, latency_s, describe(error),
                    exc_info=None if isinstance(error, BagelError) else error)
