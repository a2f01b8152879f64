"""`AppArgs`: everything `ray_config.yaml` (or `build_app`) can set, validated by pydantic.

Environment variables fill what the config leaves out: BAGEL_CHECKPOINT (checkpoint folder;
unset: the built-in demo model), BAGEL_NUM_STAGES, BAGEL_NUM_REPLICAS, BAGEL_CFG_PARALLEL,
BAGEL_DEVICE, BAGEL_DTYPE.
`num_stages: auto` and `quantize: auto` are filled in by the memory planner (cluster/plan.py).
"""
from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from bagel_model.hardware import profile_names
from bagel_model.quantize import MODES, is_approximate
from pipelines.batching import BATCH_WAIT_S, MAX_BATCH_TOKENS

from .topology import PLACEMENT_STRATEGIES, Topology, gpu_shares


class Limits(BaseModel):
    """Input limits, enforced before any model work (violations are HTTP 400)."""

    max_upload_bytes: int = Field(20 * 2**20, gt=0, description="largest accepted image upload")
    max_image_pixels: int = Field(40_000_000, gt=0, description="largest input image (W*H) decoded")
    max_aspect_ratio: float = Field(16.0, ge=1.0, description="largest long/short side ratio of an input image")
    max_images: int = Field(4, ge=1, description="images per request")
    max_request_image_pixels: int = Field(100_000_000, gt=0, description="pixels (W*H) of a request's images together")
    max_prompt_chars: int = Field(16_000, gt=0, description="characters of text per request")
    max_prompt_tokens: int = Field(4096, gt=0, description="tokens of text per request")
    max_n: int = Field(4, ge=1, description="images per generation request")
    max_num_timesteps: int = Field(200, ge=2)
    max_new_tokens: int = Field(4096, ge=1)

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: the images base64-encoded, plus 1 MiB for the rest (HTTP 413 beyond)."""
        return self.max_images * (self.max_upload_bytes * 4 // 3 + 4) + 2**20


class Autoscaling(BaseModel):
    """Serve's `autoscaling_config` for the replicas: between `min_replicas` and `max_replicas`,
    aiming at `target_ongoing_requests` per replica. Other Serve autoscaling keys
    (`upscale_delay_s`, `downscale_delay_s`, `metrics_interval_s`, ...) pass through unchanged."""

    model_config = {"extra": "allow"}

    min_replicas: int = Field(1, ge=1, description="a replica always answers (it serves /health)")
    max_replicas: int = Field(ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0, description="null: Serve's default")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self
class Warmup(BaseModel):
    """What a replica runs on its stage workers before it says it is ready (and again after it
    rebuilt them): compiling kernels, choosing GEMM and convolution algorithms and making CUDA-
    graph memory pools costs the first request on fresh workers more than twice its time."""

    model_config = {"extra": "forbid"}

    sizes: list[str] | None = Field(None, description="image sizes 'WIDTHxHEIGHT' to warm up; null: the model's "
                                    "default size when the stages use CUDA, none on CPU; [] turns warm-up off")
    tasks: list[Literal["t2i", "edit", "understand"]] = Field(default_factory=lambda: ["t2i", "edit", "understand"],
                                                             description="tasks run at each size")
    num_timesteps: int = Field(12, ge=3, description="denoising timesteps of each warm-up image")
    max_new_tokens: int = Field(16, ge=1, description="tokens of the warm-up answer")

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: list[str] | None) -> list[str] | None:
        for size in sizes or []:
            w, _, h = size.lower().partition("x")
            if not (w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
                raise ValueError(f"sizes: expected 'WIDTHxHEIGHT', got {size!r}")
        return sizes


class AppArgs(BaseModel):
    model_config = {"extra": "forbid"}

    checkpoint_dir: str | None = Field(None, description="BAGEL checkpoint folder; null: $BAGEL_CHECKPOINT or the demo model")
    model_name: str | None = Field(None, description="model id shown by /v1/models (default: folder name)")
    num_stages: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, description="pipeline stages (MoT workers); auto: the memory planner's choice")
    layer_sizes: list[int] | None = Field(None, description="LLM layers per stage (default: even split)")
    num_replicas: int = Field(1, ge=1, description="complete, independent pipelines: Serve replicas of the "
                              "ingress, each with its own stage workers")
    cfg_parallel: int = Field(1, ge=1, le=3, description="branch groups per replica, each holding every stage's "
                                           "weights: a denoising step's CFG branches run on them at once")
    autoscaling_config: Autoscaling | None = Field(None, description="scale the replicas with load instead of "
                                                   "num_replicas (Serve autoscaling)")
    placement_strategy: Literal[PLACEMENT_STRATEGIES] = Field(  # type: ignore[valid-type]
        "PACK", description="placement of each replica's stage workers (Serve's placement_group_strategy): PACK "
        "together where they fit, STRICT_PACK on one node, SPREAD over nodes")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gpus_per_stage: float | None = Field(None, ge=0, description="GPU share of each stage worker (e.g. 1, or 0.25 "
                                         "on one GPU); null: from the cluster's GPUs (gpu_shares)")
    encoder_gpus: float | None = Field(None, ge=0, description="null: from the cluster's GPUs")
    decoder_gpus: float | None = Field(None, ge=0, description="null: from the cluster's GPUs")
    stage_memory_fraction: float | None = Field(None, gt=0, le=1, description="cap of each stage process's GPU memory")
    transport: Literal["auto", "gloo", "nccl", "cuda_ipc"] = "auto"
    split_branches: bool | None = Field(None, description="CFG branches as separate micro-batches (default: when >1 stage)")
    max_concurrent_requests: int = Field(8, ge=1, description="requests worked on at once")
    max_batch_tokens: int = Field(MAX_BATCH_TOKENS, ge=0, description="query tokens per denoising forward shared "
                                  "by concurrent requests' steps (pipelines/batching.py); 0: no batching")
    batch_wait_s: float = Field(BATCH_WAIT_S, ge=0, description="how long a step waits for the other requests' "
                                "next steps (only while some are still handling their last one)")
    max_queued_requests: int = Field(32, ge=0, description="requests waiting beyond that; more get 429")
    retry_after_s: int = Field(2, ge=1)
    stage_rebuild_tries: int = Field(5, ge=1, description="attempts to rebuild the stage workers after one died; "
                                     "then /health says failed and Serve replaces the replica")
    stage_rebuild_backoff_s: float = Field(2.0, gt=0, description="wait after the first failed rebuild; doubles "
                                           "after each further one (at most 60 s)")
    request_timeout_s: float = Field(600.0, gt=0, description="per-request deadline, queueing included (504 after)")
    kv_cache_bytes: int | None = Field(None, gt=0, description="KV-cache budget per stage; requests wait for room (null: no limit)")
    prefix_cache: bool = Field(True, description="keep prompt prefixes' KV caches for later requests to reuse "
                               "(README, Prefix caching)")
    prefix_cache_bytes: int = Field(4 * 2**30, gt=0, description="the prefix cache's KV bytes per stage, beside the "
                                    "requests'; least recently used prefixes are evicted beyond it")
    image_memory_bytes: int = Field(2 * 2**30, gt=0, description="ingress memory for decoded input images, "
                                    "estimated from their headers (8 bytes a pixel); requests wait for room")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer <key>' on /v1/* ($BAGEL_API_KEY)")
    warmup: Warmup = Field(default_factory=Warmup, description="requests run before /health says ready")
    sse_keepalive_s: float = Field(15.0, gt=0, description="a keep-alive comment on an event stream that was "
                                   "quiet this long (a request waiting in the queue), so proxies keep it open")
    limits: Limits = Field(default_factory=Limits)
    image_url_ttl_s: float = Field(3600.0, gt=0, description="how long an image of response_format 'url' stays "
                                   "available (OpenAI: 60 minutes)")
    image_url_store_bytes: int = Field(512 * 2**20, ge=2**20, description="memory for those images; beyond it "
                                       "the oldest go early")
    image_url_store_images: int = Field(1000, ge=1, description="images kept for URLs at most")
    preview_decoder: Literal["linear", "vae"] = Field(
        "linear", description="partial images: 'linear' (a latent-to-RGB map, 1/8 size, ~free) or 'vae' (the "
        "VAE decoder, full size, one decode per preview)")
    compile: bool | None = Field(None, description="fused torch.compile'd elementwise kernels in the stages "
                                 "(null: on when the stages use CUDA)")
    fp8: bool = Field(False, description="APPROXIMATE: FP8 GEMMs (torchao float8 rowwise) for the generation "
                      "expert's MLP only (Ada/Hopper GPUs); faster denoising, outputs differ from the exact model "
                      "(README, Measured)")
    quantize: Literal[(*MODES, "auto")] | None = Field(
        None, description="weight format of the LLM's linear layers: null (exact bf16), df11 (lossless, ~70% of "
        "the size), int8, nf4, fp8 (APPROXIMATE); auto: the memory planner's choice (bagel plan)")
    quantize_vit: bool = Field(False, description="the ViT's linear layers in the same format (encoder)")
    gpu_memory_gib: float | None = Field(None, gt=0, description="GPU memory the planner plans for, per GPU "
                                         "(null: the first GPU's own); e.g. 24 on larger cards to plan for 24 GB ones")
    random_weights: bool = Field(False, description="benchmarks: random weights made on the devices; "
                                 "checkpoint_dir then needs only configs and tokenizer")
    simulate: str | None = Field(None, description="no model: every GPU component sleeps for what this hardware "
                                 "profile (bagel_model/hardware.json: h200, rtx4090) says its work takes, and returns "
                                 "placeholder tensors; for timing topologies on a CPU machine (bench/simulate.py). "
                                 "checkpoint_dir defaults to the BAGEL-7B-MoT configuration without weights")
    simulate_time_scale: float = Field(1.0, gt=0, description="simulate: real seconds per simulated second")

    @model_validator(mode="before")
    @classmethod
    def _environment(cls, values: dict) -> dict:
        values = dict(values or {})
        env = {"checkpoint_dir": "BAGEL_CHECKPOINT", "num_stages": "BAGEL_NUM_STAGES",
               "num_replicas": "BAGEL_NUM_REPLICAS", "cfg_parallel": "BAGEL_CFG_PARALLEL",
               "device": "BAGEL_DEVICE", "dtype": "BAGEL_DTYPE", "api_key": "BAGEL_API_KEY"}
        for key, var in env.items():
            if values.get(key) is None and os.environ.get(var):
                values[key] = os.environ[var]
        return values

    @model_validator(mode="after")
    def _one_weight_format(self) -> AppArgs:
        if self.fp8 and self.quantize is not None:
            raise ValueError("fp8: true (FP8 for the generation expert's MLP) and quantize both set the weights' "
                             "format; choose one (quantize: fp8 is FP8 for every linear layer)")
        return self

    @model_validator(mode="after")
    def _known_profile(self) -> AppArgs:
        if self.simulate is not None and self.simulate not in profile_names():
            raise ValueError(f"simulate: unknown hardware profile {self.simulate!r}; known: {profile_names()}")
        return self

    @model_validator(mode="after")
    def _one_replica_count(self) -> AppArgs:
        if self.autoscaling_config is not None and self.num_replicas != 1:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        return self

    @property
    def topology(self) -> Topology:
        """Replicas (at most, with autoscaling) x branch groups x stages (once num_stages is planned)."""
        replicas = self.autoscaling_config.max_replicas if self.autoscaling_config else self.num_replicas
        return Topology(replicas, self.cfg_parallel, self.num_stages)


def approximate_modes(args: AppArgs) -> list[str]:
    """The APPROXIMATE modes these args turn on (/health lists them); df11 is exact."""
    if args.fp8:
        return ["fp8"]
    return [args.quantize] if is_approximate(args.quantize) else []


def with_gpu_shares(args: AppArgs, cluster_gpus: float) -> AppArgs:
    """`args` with every unset GPU share filled in from the cluster's GPU count (`gpu_shares`)."""
    shares = gpu_shares(args.topology, cluster_gpus)
    chosen = {"gpus_per_stage": shares.stage, "encoder_gpus": shares.encoder, "decoder_gpus": shares.decoder}
    return args.model_copy(update={k: v for k, v in chosen.items() if getattr(args, k) is None})
