"""`BagelService`: the request lifecycle behind the HTTP routes and the Ray handle methods.

It owns the pipeline's stage group (through a `StageSupervisor`, which replaces the group when a
worker dies) and runs the `pipelines/` algorithms through a `ClusterExecutor`, one worker thread
per request in flight (a `Job`). Requests beyond `max_concurrent_requests` wait in a bounded
queue; beyond that they get `Overloaded`. A cancelled request stops at its next step; its contexts
are freed on every stage whatever way it ends. Each request is logged through the `ray.serve`
logger with its id: admitted, then finished (outcome, latency) or failed (error).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import ray
from PIL import Image

from bagel_model.config import BagelConfig
from bagel_model.demo import DEMO_LABEL, checkpoint_or_demo, is_demo_checkpoint
from bagel_model.errors import BagelError, InvalidRequest
from bagel_model.simulated import Simulation
from bagel_model.tokenizer import BagelTokenizer
from pipelines.noise import NoiseSource, random_seed
from pipelines.previews import Preview, PreviewRenderer
from pipelines.tasks import generate_image, understand

from .admission import Admission, kv_bytes_estimate
from .api import ImageOutput, ImageTask, TextOutput, TextTask
from .args import AppArgs, approximate_modes
from .devices import placed_device, resolve_dtype
from .errors import Cancelled, StageFailed, describe
from .executor import ClusterExecutor
from .image_encoding import encode_image
from .image_store import ImageStore, StoreClient
from .inputs import checked_items, decoded, decoded_bytes
from .jobs import Job, cancel_all
from .metrics import Metrics
from .stage_group import StageGroup
from .supervisor import StageSupervisor

log = logging.getLogger("ray.serve")


class BagelService:
    def __init__(self, args: AppArgs, encoder, decoder, make_stages: Callable[[], StageGroup] | None = None,
                 image_store=None, replica: int | None = None):
        """`make_stages` builds the stage group (default: from `args`; tests inject their own);
        `image_store`: the application's `ImageStoreDeployment` (default: a store in this process);
        `replica`: this replica's index among the deployment's (for /health)."""
        self.args, self.limits, self.replica = args, args.limits, replica
        self.checkpoint = str(checkpoint_or_demo(args.checkpoint_dir))
        self.is_demo = is_demo_checkpoint(self.checkpoint)
        self.model_name = args.model_name or ("bagel-demo" if self.is_demo else Path(self.checkpoint).name)
        self.config = BagelConfig.from_checkpoint_dir(self.checkpoint)
        self.tokenizer = BagelTokenizer.from_dir(self.checkpoint)
        self.device = placed_device(args.device, args.gpus_per_stage)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.simulation = Simulation.named(args.simulate, args.simulate_time_scale) if args.simulate else None
        self.supervisor = StageSupervisor(make_stages or self._make_stages, max_tries=args.stage_rebuild_tries,
                                          backoff_s=args.stage_rebuild_backoff_s, on_replaced=self._use_stages)
        self.executor = ClusterExecutor(self.config, self.tokenizer, self.stages, encoder, decoder,
                                        args.split_branches)
        self.pool = ThreadPoolExecutor(args.max_concurrent_requests, thread_name_prefix="request")
        self.preview_pool = ThreadPoolExecutor(args.max_concurrent_requests, thread_name_prefix="preview")
        self.image_store = StoreClient(image_store or ImageStore(args.image_url_store_bytes,
                                                                 args.image_url_store_images, args.image_url_ttl_s))
        self.admission = Admission(args.max_concurrent_requests, args.max_queued_requests,
                                   args.kv_cache_bytes, args.retry_after_s, args.image_memory_bytes)
        self.metrics = Metrics()
        self.completed = 0

    @property
    def stages(self) -> StageGroup:
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
        self.executor.stages = group

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
        return await self._start_all("image", self._image_work, task, n)

    async def start_text(self, task: TextTask) -> Job:
        [job] = await self.start_texts(task, 1)
        return job

    async def start_texts(self, task: TextTask, n: int) -> list[Job]:
        """Check the parameters, then admit and queue `n` answers (seeds seed, seed + 1, ...)."""
        task.params.validate(self.limits.max_new_tokens)
        return await self._start_all("text", self._text_work, task, n)

    async def _start_all(self, kind: str, work: Callable, task: ImageTask | TextTask, n: int) -> list[Job]:
        task = replace(task, items=checked_items(task.items, self.limits))
        jobs: list[Job] = []
        try:
            for i in range(n):
                jobs.append(await self._start(kind, work, _with_seed(task, i)))
        except BaseException:
            cancel_all(jobs)
            raise
        return jobs

    async def _start(self, kind: str, work: Callable, task: ImageTask | TextTask) -> Job:
        """Admit the request (or raise Overloaded), then queue it for a worker thread. Its items
        have passed `checked_items`: images are still encoded, and decoded on the worker thread
        within the memory admission reserves for them."""
        self._check_stages()
        job = Job(secrets.token_hex(12), self.args.request_timeout_s)
        layers = max(len(s.layers) for s in self.stages.specs)
        kv_bytes = kv_bytes_estimate(task, self.config, self.tokenizer, layers, self.dtype.itemsize,
                                     self.limits.max_prompt_tokens)
        image_bytes = decoded_bytes(task.items)
        try:
            await self.admission.enter(kv_bytes, image_bytes)
        except BagelError as e:
            log.info("request %s (%s) refused: %s", job.request_id, kind, describe(e))
            raise
        log.info("request %s (%s) admitted: %d in the system, ~%d KV bytes per stage", job.request_id, kind,
                 self.admission.in_system, kv_bytes)
        job.submit(self.pool, lambda: self._run(job, kind, work, task, kv_bytes, image_bytes))
        return job

    def _check_stages(self) -> None:
        state = self.supervisor.state
        if state == "restarting":
            raise StageFailed("the MoT stage workers are restarting after a failure; retry shortly",
                              retry_after_s=self.args.retry_after_s)
        if state == "failed":
            raise StageFailed(f"{self.supervisor.error}; this replica is being replaced",
                              retry_after_s=self.args.retry_after_s)

    def _run(self, job: Job, kind: str, work: Callable, task, kv_bytes: int, image_bytes: int):
        """The request on its worker thread, from leaving the queue to its result."""
        outcome, error = "error", None
        try:
            job.emit({"type": "started", "queue_s": time.monotonic() - job.created})
            result = work(task, job)
            outcome = "ok"
            return result
        except ray.exceptions.RayError as e:
            self.supervisor.stage_failed(e)
            error = StageFailed(f"a worker failed: {describe(e)}")
            raise error from None
        except BagelError as e:
            outcome, error = type(e).__name__, e
            raise
        except Exception as e:
            error = e
            raise
        finally:
            latency_s = time.monotonic() - job.created
            _log_end(job, kind, latency_s, error)
            job.loop.call_soon_threadsafe(self._done, kind, outcome, latency_s, kv_bytes, image_bytes)

    def _done(self, kind: str, outcome: str, latency_s: float, kv_bytes: int, image_bytes: int) -> None:
        self.completed += 1
        self.metrics.request(kind, outcome, latency_s)
        asyncio.ensure_future(self.admission.leave(kv_bytes, image_bytes))

    def _image_work(self, task: ImageTask, job: Job) -> ImageOutput:
        seed = task.seed if task.seed is not None else random_seed()
        previews = self._preview_renderer(task, job) if task.previews else None
        try:
            result = generate_image(
                self.executor, decoded(task.items), task.params, think=task.think, text_params=task.text_params,
                noise=NoiseSource(seed), negative_prompt=task.negative_prompt,
                on_step=lambda p: job.emit({"type": "progress", "step": p.step, "num_steps": p.num_steps}),
                on_text=lambda delta: job.emit({"type": "thought", "delta": delta}),
                previews=task.previews, on_preview=previews,
            )
            data = encode_image(result.image, task.output)
            if previews is not None:
                previews.wait()  # every preview is sent before the image
        except BaseException:
            if previews is not None:
                previews.cancel()
            raise
        thought = result.thought.text if result.thought else None
        return ImageOutput(data, result.image.width, result.image.height, seed, thought, task.output.format)

    def _preview_renderer(self, task: ImageTask, job: Job) -> PreviewRenderer:
        """Previews rendered on the preview threads, sent as `partial_image` events in the
        image's output format."""
        def send(preview: Preview, image: Image.Image) -> None:
            job.emit({"type": "partial_image", "partial_image_index": preview.index, "step": preview.step,
                      "num_steps": preview.num_steps, "width": preview.width, "height": preview.height,
                      "b64_json": base64.b64encode(encode_image(image, task.output)).decode()})

        return PreviewRenderer(self.executor, self.args.preview_decoder, self.preview_pool, send)

    def _text_work(self, task: TextTask, job: Job) -> TextOutput:
        result = understand(self.executor, decoded(task.items), task.params, think=task.think, seed=task.seed,
                            on_text=lambda delta: job.emit({"type": "text", "delta": delta}))
        return TextOutput(result.text, len(result.token_ids), result.finish_reason)

    # -- state ------------------------------------------------------------------------------

    async def stats(self) -> dict:
        stages = await asyncio.to_thread(self.stages.broadcast, "stats")
        for name, key in (("live_kv_contexts", "live_contexts"), ("kv_bytes", "kv_bytes"),
                          ("gpu_memory_bytes", "gpu_memory_bytes")):
            self.metrics.set(name, sum(s[key] or 0 for s in stages))
        self.metrics.set("queue_depth", self.admission.in_system)
        return {"replica": self.replica, "topology": str(self.args.topology), "links": self.stages.links,
                "requests_in_system": self.admission.in_system, "requests_completed": self.completed,
                "kv_reserved_bytes": self.admission.kv_reserved, "image_reserved_bytes": self.admission.image_reserved,
                "stages": stages}

    async def health(self) -> tuple[int, dict]:
        """(HTTP status, body): 200 "ok" with every stage worker's stats (its replica, branch
        group, stage and pid among them); 503 "degraded" while the stage
        workers are unreachable or being replaced; 503 "failed" once they cannot be rebuilt."""
        base = {"model": self.model_name, "replica": self.replica, "demo": self.is_demo,
                "notice": DEMO_LABEL if self.is_demo else None, "quantize": self.args.quantize,
                "approximate": approximate_modes(self.args), "simulated": self.args.simulate}
        if self.supervisor.state == "failed":
            return 503, {**base, "status": "failed", "error": self.supervisor.error}
        if self.supervisor.state == "restarting":
            return 503, {**base, "status": "degraded", "error": "stage workers restarting"}
        try:
            stats = await asyncio.wait_for(self.stats(), timeout=10)
        except Exception as e:  # a dead or hung worker makes the service degraded until replaced
            if isinstance(e, ray.exceptions.RayError):
                self.supervisor.stage_failed(e)
            return 503, {**base, "status": "degraded", "error": f"{type(e).__name__}: {e}"}
        return 200, {**base, "status": "ok", **stats}

    def check_health(self) -> None:
        """Raises once the stage workers cannot be rebuilt, so that Serve replaces the replica."""
        if self.supervisor.state == "failed":
            raise StageFailed(self.supervisor.error)

    async def metrics_text(self) -> str:
        """Prometheus text, with the stage gauges refreshed when the stages answer."""
        if self.supervisor.state == "ok":
            try:
                await asyncio.wait_for(self.stats(), timeout=10)
            except Exception:  # the gauges keep their last values; /health reports the failure
                pass
        return self.metrics.prometheus_text()


def _with_seed(task: ImageTask | TextTask, index: int) -> ImageTask | TextTask:
    return replace(task, seed=task.seed + index) if task.seed is not None and index else task


def _log_end(job: Job, kind: str, latency_s: float, error: BaseException | None) -> None:
    if error is None:
        log.info("request %s (%s) finished: ok in %.2f s", job.request_id, kind, latency_s)
    elif isinstance(error, (Cancelled, InvalidRequest)):
        log.info("request %s (%s) ended after %.2f s: %s", job.request_id, kind, latency_s, describe(error))
    else:
        log.warning("request %s (%s) failed after %.2f s: %s", job.request_id, kind, latency_s, describe(error),
                    exc_info=None if isinstance(error, BagelError) else error)
