"""Weight formats on one GPU (bagel_model/quantize.py): memory, speed and quality against exact bf16.

    python -m bench.quant --out bench/results --name quant_h200      # the full-size model, ~6 minutes
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python -m bench.quant --formats df11 --nf4-cap-gib 0 \
        --no-fp8-kernels --out bench/results --name quant_df11_h200   # df11 on one 24 GB card, ~3 minutes
    python -m bench.quant --formats fp8 --tasks t2i --nf4-cap-gib 0  # FP8 only, text-to-image, ~1 minute

For each format the whole model runs in one process capped at `--cap-gib` (a 24 GB card: the
allocator gets the cap minus the CUDA context this process measured), with the full-size
BAGEL-7B-MoT architecture and random bf16 weights made on the GPU one decoder layer at a time and
quantized as they are made (no 30 GB checkpoint to write first: the layer-by-layer path is the
loader's, only the source of the numbers differs; tests/test_quantize.py covers loading from a
file). Every format gets the same bf16 weights (same seeds), so quality is measured against the
exact model on the same noise:

- peak allocated memory, text-to-image and edit seconds at `--size` (one run each, after a
  3-step warm-up of the same model), decode tokens/s at batch 1 and 8;
- latent relative L2 distance and decoded-image PSNR against the exact run, greedy-token
  agreement of a `--answer-tokens` answer about an image; df11: bit-identical or not (with equal
  latents but other pixels, whether the exact latents decoded under the same cap give them);
- per-layer weight reconstruction error of the first and last layers' linear weights (does not
  depend on what the weights are), and for df11 the GPU decoder against the torch decoder;
- FP8 for the generation expert's MLP only (`fp8: true`, `quantize_gen_mlp`), uncapped, next
  to `quantize: fp8` (every linear layer) and the exact model;
- the memory planner's estimate (`processes="local"`) next to each measured peak, and its
  layouts for one, two and three 24 GB cards. Each capped run captures CUDA graphs only if the
  planner fits them under the cap (a speed option; df11 at 1024x1024 runs without).

Runs are ordered by priority (the per-layer errors, which take seconds; 1x24 GB df11 / int8 /
nf4, then fp8; nf4 under `--nf4-cap-gib` at the largest size the planner fits there; fp8 for the
generation MLP only); `--tasks` picks what each run measures; the JSON is rewritten after every
measurement and runs that would start after `--budget-s` are skipped, so a timeout loses little.
On the CPU with `--checkpoint` (the tests) everything runs on the fixture model, uncapped.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import time
from argparse import Namespace
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
from PIL import Image

from bagel_model.config import BagelConfig
from bagel_model.demo import demo_tokenizer, init_random_weights, random_module, random_quantized
from bagel_model.df11 import Df11Tensor, decode
from bagel_model.errors import InvalidRequest
from bagel_model.kernels import KernelChoice, select_kernels
from bagel_model.latents import unpatchify
from bagel_model.loader import load_vae, load_vision_encoder
from bagel_model.memory_plan import GiB, Workload, plan_memory
from bagel_model.model import BagelStage
from bagel_model.mot import MoTDecoderLayer
from bagel_model.quantize import MODES, quantize_gen_mlp, quantize_weight, tensor_bytes, weight_bytes
from bagel_model.stage import full_model
from bagel_model.tokenizer import BagelTokenizer
from bagel_model.vae import AutoEncoder
from bagel_model.vit import VisionEncoder
from bench.latency import Timed, _decode_rate, bench_edit, bench_t2i, deviation, edit_job, sync, t2i_job
from bench.provenance import commit, write_report
from pipelines.local import LocalExecutor
from pipelines.noise import NoiseSource
from pipelines.params import TextParams
from pipelines.tasks import generate_image, understand

TASKS = ("t2i", "edit", "answer", "decode")
STAGE_SEED = 0  # the LLM's random weights (per decoder layer: STAGE_SEED + 1 + index)
QUESTION = "Describe this picture in detail."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: random full-size weights)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--formats", default="df11,int8,nf4,fp8", help="in priority order")
    p.add_argument("--cap-gib", type=float, default=24.0, help="GPU memory of the card emulated")
    p.add_argument("--nf4-cap-gib", type=float, default=12.0, help="nf4 again under this cap, last (0: skip)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--answer-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"what each run measures, of {','.join(TASKS)}")
    p.add_argument("--no-fp8-kernels", action="store_true", help="skip fp8 for the generation MLP only (fp8: true)")
    p.add_argument("--no-compile", action="store_true", help="plain elementwise kernels (default: compiled on CUDA)")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no run after this many seconds")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default="quant")
    args = p.parse_args(argv)
    bench = QuantBench(args)
    bench.run()
    print(f"wrote {bench.path} in {time.perf_counter() - bench.start:.0f} s")
    return 0


class QuantBench:
    def __init__(self, args: Namespace):
        self.args, self.start = args, time.perf_counter()
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.formats = [f for f in args.formats.split(",") if f]
        unknown = set(self.formats) - set(MODES)
        if unknown:
            raise SystemExit(f"unknown formats {sorted(unknown)}; choose from {MODES}")
        self.tasks = [t for t in args.tasks.split(",") if t]
        if set(self.tasks) - set(TASKS):
            raise SystemExit(f"unknown tasks {sorted(set(self.tasks) - set(TASKS))}; choose from {TASKS}")
        torch.backends.cuda.matmul.allow_tf32 = False
        self.kernels = select_kernels(self.device, KernelChoice(compile=self.cuda and not args.no_compile))
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.context_bytes = _cuda_context_bytes(self.device) if self.cuda else 0
        if args.checkpoint:
            self.config = BagelConfig.from_checkpoint_dir(args.checkpoint)
            self.tokenizer = BagelTokenizer.from_dir(args.checkpoint)
            self.vision = load_vision_encoder(args.checkpoint, self.config, device=self.device, dtype=self.dtype)
            self.vae = load_vae(args.checkpoint, self.config, device=self.device)
        else:
            self.config, self.tokenizer = BagelConfig(), demo_tokenizer()
            self.vision = random_module(lambda: VisionEncoder(self.config), self.device, self.dtype, 1)
            self.vae = random_module(lambda: AutoEncoder(self.config.vae), self.device, torch.float32, 2)
        # bench.latency's jobs and timers read these settings (one run each, no warm-up there)
        self.job = Namespace(size=args.size, steps=args.steps, repeats=1, warmup=0, cfg_refresh_interval=1)
        self.report = {
            "benchmark": "quant", "device": torch.cuda.get_device_name(self.device) if self.cuda else
            platform.processor() or "cpu", "torch": torch.__version__, "torchao": _version("torchao"),
            "triton": _version("triton"), "python": platform.python_version(), "commit": commit(),
            "weights": args.checkpoint or "random bf16 (full-size BAGEL-7B-MoT architecture)",
            "settings": vars(args), "cuda_context_bytes": self.context_bytes,
            "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "layouts": _layouts(self.config), "runs": {}, "layer_errors": {}, "skipped": []}
        self.path = None
        self.reference: dict = {}

    # -- the run list ---------------------------------------------------------------------

    def run(self) -> None:
        self.warm_up()
        self.exact()
        for fmt in self.formats:  # cheap, and independent of what the weights are
            self.timed(f"{fmt} layer errors", lambda f=fmt: self.layer_errors(f))
        for fmt in self.formats:
            self.format_run(fmt, fmt, self.args.cap_gib, self.args.size)
        if self.args.nf4_cap_gib and "nf4" in self.formats:
            size = self.largest_fitting_size("nf4", self.args.nf4_cap_gib)
            self.format_run(f"nf4 @ {self.args.nf4_cap_gib:g} GiB", "nf4", self.args.nf4_cap_gib, size)
        if not self.args.no_fp8_kernels and "fp8" in self.formats and "t2i" in self.tasks:
            self.timed("fp8 gen-MLP", self.fp8_gen_mlp)
        if self.cuda:  # libraries loaded since the start (cuDNN, cuBLASLt kernels) are outside the allocator too
            self.report["cuda_context_bytes_at_end"] = _cuda_context_bytes(self.device)
        self.write()

    def over_budget(self, what: str) -> bool:
        if time.perf_counter() - self.start > self.args.budget_s:
            self.report["skipped"].append(what)
            self.write()
            return True
        return False

    def timed(self, what: str, fn) -> None:
        """Run `fn` unless over budget; a failure is recorded, not raised."""
        if not self.over_budget(what):
            try:
                fn()
            except Exception as e:
                self.report.setdefault("errors", {})[what] = f"{type(e).__name__}: {e}"
            self.write()

    def write(self) -> None:
        self.report["elapsed_s"] = time.perf_counter() - self.start
        self.path = write_report(self.report, self.args.out, f"{self.args.name}.json")

    # -- runs ---------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compile the elementwise kernels and load the GEMM libraries once for all runs."""
        stage = self.stage(None)
        executor = self.executor(stage)
        self.report["warm_up_s"] = self.short_run(executor)
        executor.free(executor.live_contexts())
        del stage, executor
        self.collect()

    def short_run(self, executor, job: Namespace | None = None) -> float:
        """A 3-step text-to-image: each format's first-call costs (kernel compilation, library
        initialisation) out of the timed runs. Returns its seconds."""
        items, params = t2i_job(job or self.job)
        t = time.perf_counter()
        generate_image(executor, items, replace(params, num_timesteps=3), noise=NoiseSource(0))
        sync()
        return time.perf_counter() - t

    def exact(self) -> None:
        """The exact bf16 model, uncapped: the reference outputs and the baseline numbers."""
        run = self.report["runs"]["bf16"] = {"quantize": None, "cap_bytes": None}
        stage, executor = self.build(run, None)
        recording = _KeepsDecoded(executor)
        for task, job in (("t2i", t2i_job), ("edit", edit_job)):
            if task in self.tasks:
                items, params = job(self.job)
                self.reference[task] = generate_image(recording, items, params, noise=NoiseSource(0))
        if "edit" in self.tasks:
            self.reference["edit_encodings"] = recording.encodings
        if "answer" in self.tasks:
            self.reference["answer"] = self.answer(executor, self.args.size)
        self.measure("bf16", run, executor, self.job, {})
        del stage, executor, recording
        self.collect()

    def format_run(self, name: str, fmt: str, cap_gib: float, size: int) -> None:
        """One format under a cap, at `size` (compared with the exact run when that is its size)."""
        if self.over_budget(name):
            return
        cap = int(cap_gib * GiB) if self.cuda else None
        job = Namespace(**{**vars(self.job), "size": size})
        run = self.report["runs"][name] = {"quantize": fmt, "cap_bytes": cap, "size": size,
                                           "planner": self.planner(fmt, cap_gib, size)}
        self.cap(cap)
        stage = executor = None
        try:
            stage, executor = self.build(run, fmt, run["planner"]["graphs"])
            run["warm_up_s"] = self.short_run(executor, job)
            self.measure(name, run, executor, job, self.reference if size == self.args.size else {})
        except torch.OutOfMemoryError as e:
            run["error"] = f"out of memory: {str(e).splitlines()[0]}"
            run["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        except Exception as e:  # a format that fails here is a result; the other runs go on
            run["error"] = f"{type(e).__name__}: {e}"
        finally:
            if executor is not None:
                executor.free(executor.live_contexts())  # what an out-of-memory error left behind
            del stage, executor
            self.collect()
            self.cap(None)
        self.write()

    def build(self, run: dict, fmt: str | None, graphs: bool | None = None):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        stage = self.stage(fmt)
        sync()
        run["build_s"] = time.perf_counter() - t
        run["llm_weight_bytes"] = weight_bytes(stage)
        run["vit_vae_weight_bytes"] = weight_bytes(self.vision) + weight_bytes(self.vae)
        if self.cuda:
            run["build_peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        run["graphs"] = self.cuda if graphs is None else graphs
        self.write()
        return stage, self.executor(stage, graphs)

    def measure(self, name: str, run: dict, executor, job: Namespace, reference: dict) -> None:
        """T2I and edit (timed; with their deviation from `reference`, the exact run's results
        at this size, if any), the answer, decode rates (the exact run's always: it is the
        baseline)."""
        timed = _KeepsDecoded(executor)
        skip = lambda what: run["quantize"] is not None and self.over_budget(f"{name} {what}")  # noqa: E731
        for task, bench in (("t2i", bench_t2i), ("edit", bench_edit)):
            if task not in self.tasks:
                continue
            if skip(task):
                return
            exact = reference.get(task)
            result = bench(timed, job, exact)
            if exact is not None:
                dev = result["deviation_from_exact"]
                result["bit_identical"] = dev["latent_relative_l2"] == 0.0 and math.isinf(dev["image_psnr_db"])
                if dev["latent_relative_l2"] == 0.0 and not result["bit_identical"]:
                    # equal latents, other pixels: the VAE (unchanged by any format) ran other
                    # kernels here, as cuDNN picks them by the memory free; the exact latents
                    # decoded under the same cap tell whether that is all
                    result["exact_latents_decoded_here_equal"] = torch.equal(
                        self.decoded_here(executor, exact), timed.decoded)
                if task == "edit" and not result["bit_identical"] and "edit_encodings" in reference:
                    self.given_exact_encodings(result, timed, executor, job, exact, reference["edit_encodings"])
            run[task] = {k: v for k, v in result.items() if k not in ("runs", "settings")}
            self.write()
        if "answer" in self.tasks and "answer" in reference:
            ids, ref = self.answer(executor, job.size), reference["answer"]
            n = min(len(ids), len(ref))
            first = next((i for i in range(n) if ids[i] != ref[i]), n)
            run["answer"] = {"tokens": len(ids), "exact_tokens": len(ref), "first_difference": first,
                             "agreement": float(np.mean([a == b for a, b in zip(ids, ref)])) if n else 1.0}
        if "decode" in self.tasks and not skip("decode"):
            # a fresh executor on the same weights: its decode slots are sized for these short
            # prompts, not grown to the answer's image context (8 such slots would not fit a 24 GB card)
            fresh = self.executor(executor.stages[0], run["graphs"])
            run["decode_tokens_per_s"] = {str(b): _decode_rate(fresh, b, self.args.decode_tokens)["tokens_per_s"]
                                          for b in (1, 8)}
            del fresh
        if self.cuda:  # the tasks' own peaks (each reset the counter) and what came after
            run["peak_memory_bytes"] = max([torch.cuda.max_memory_allocated(self.device)] +
                                           [run[t]["peak_memory_bytes"] for t in ("t2i", "edit") if t in run])

    def given_exact_encodings(self, result: dict, timed: _KeepsDecoded, executor, job: Namespace, exact,
                              encodings: dict) -> None:
        """An edit that differs from the exact run: were the input image's encodings (ViT, VAE
        encoder: never quantized, but cuDNN picks their convolution kernels by the memory free,
        so a capped process may run other ones) already different? If so, the edit again with
        the exact run's encodings tells whether the LLM (the only quantized part) is exact."""
        equal = {k: torch.equal(v, encodings[k]) for k, v in timed.encodings.items() if k in encodings}
        result["input_encodings_equal_exact"] = equal
        if all(equal.values()):
            return
        items, params = edit_job(job)
        given = generate_image(_GivenEncodings(executor, encodings), items, params, noise=NoiseSource(0))
        dev = deviation(given, exact)
        result["given_exact_encodings"] = {"latent_relative_l2": dev["latent_relative_l2"],
                                           "latents_bit_identical": dev["latent_relative_l2"] == 0.0}

    def decoded_here(self, executor, exact) -> torch.Tensor:
        """The exact run's final latents through this run's VAE, as `generate_image` decodes them."""
        cfg, (width, height) = self.config, exact.image.size
        latent = unpatchify(exact.latent, *cfg.latent_grid(height, width), p=cfg.latent_patch_size,
                            channels=cfg.latent_channels)
        return executor.decode_latents(latent)

    def answer(self, executor, size: int) -> list[int]:
        rng = np.random.default_rng(1)
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        return understand(executor, [image, QUESTION], TextParams(max_new_tokens=self.args.answer_tokens)).token_ids

    def fp8_gen_mlp(self) -> None:
        """`fp8: true` (FP8 for the generation expert's MLP only) on the same bf16 weights,
        uncapped: text-to-image against the exact run (the report sets it beside `quantize: fp8`)."""
        run = self.report["runs"]["fp8 gen-MLP"] = {"quantize": "fp8-gen-mlp", "cap_bytes": None}
        stage = quantize_gen_mlp(self.stage(None))
        run["llm_weight_bytes"] = weight_bytes(stage)
        executor = Timed(self.executor(stage))
        run["warm_up_s"] = self.short_run(executor.inner)
        result = bench_t2i(executor, self.job, self.reference.get("t2i"))
        run["t2i"] = {k: v for k, v in result.items() if k not in ("runs", "settings")}
        del stage, executor
        self.collect()

    def layer_errors(self, fmt: str) -> None:
        """Relative L2 error of each linear weight of the first and last decoder layers, as the
        format stores it (df11: whether it decodes bit for bit, on the GPU and with torch ops)."""
        out = self.report["layer_errors"][fmt] = {}
        layers = self.config.llm.num_hidden_layers
        for index in sorted({0, layers - 1}):
            layer = _random_layer(self.config, index, self.device, self.dtype)
            dense = [(name, m.weight) for name, m in _grouped_weights(layer)]
            for name, w in dense:
                stored = quantize_weight(w, fmt)
                back = _dense(stored).to(w.dtype)
                entry = {"relative_l2": float((back.float() - w.float()).norm() / w.float().norm()),
                         "max_abs": float((back.float() - w.float()).abs().max()),
                         "bits_per_weight": 8 * tensor_bytes(stored) / w.numel()}
                if isinstance(stored, Df11Tensor):
                    bits = w.to(torch.bfloat16).view(torch.int16)
                    entry["bit_identical"] = torch.equal(stored.dense().to(torch.bfloat16).view(torch.int16), bits)
                    entry["torch_decoder_bit_identical"] = torch.equal(decode(stored.packed).view(torch.int16), bits)
                    entry["decoder"] = stored.decoder.__name__
                out[f"layer {index} {name}"] = entry
            del layer, dense

    # -- helpers -------------------------------------------------------------------------

    def stage(self, fmt: str | None) -> BagelStage:
        """The LLM with this run's weights: made one decoder layer at a time (the same seeds for
        every format), or loaded from --checkpoint."""
        if self.args.checkpoint:
            from bagel_model.loader import load_stage

            return load_stage(self.args.checkpoint, self.config, device=self.device, dtype=self.dtype, quantize=fmt,
                              kernels=self.kernels)
        spec = full_model(self.config.llm.num_hidden_layers)
        return random_quantized(lambda: BagelStage(self.config, spec, self.kernels), self.device, self.dtype,
                                STAGE_SEED, fmt)

    def executor(self, stage: BagelStage, graphs: bool | None = None) -> LocalExecutor:
        return LocalExecutor(self.config, self.tokenizer, [stage], self.vision, self.vae, graphs=graphs)

    def collect(self) -> None:
        """Hand the memory of the models just dropped back to the GPU."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def cap(self, cap: int | None) -> None:
        """Allow this process's allocator `cap` bytes of the GPU minus the CUDA context (None: all)."""
        if self.cuda:
            total = torch.cuda.get_device_properties(self.device).total_memory
            fraction = 1.0 if cap is None else max(cap - self.context_bytes, 0) / total
            torch.cuda.set_per_process_memory_fraction(fraction, self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def largest_fitting_size(self, fmt: str, cap_gib: float) -> int:
        """The largest image side (a multiple of 128, at most --size) the planner fits under the cap."""
        sides = range(self.args.size, 0, -128)
        return next((s for s in sides if self.planner(fmt, cap_gib, s)["fits"]), sides[-1])

    def planner(self, fmt: str, cap_gib: float, size: int) -> dict:
        """What the memory planner expects of this run (one process on one GPU): whether it fits
        the cap, with CUDA graphs or without (the run follows), its terms, and the peak
        `max_memory_allocated` should show (all but the CUDA context, plus one request's KV)."""
        def plan(gpu_bytes: int, graphs: bool | None = None):
            return plan_memory(self.config, 1, gpu_bytes, Workload(1, size), num_stages=1, quantize=fmt,
                               processes="local", cuda=self.cuda, graphs=graphs)

        try:
            fits, graphs = True, plan(int(cap_gib * GiB)).graphs
        except InvalidRequest:
            fits, graphs = False, self.cuda or None
        # the terms do not depend on the GPU's size; only the KV budget does
        unbounded = plan(1 << 50, graphs)
        items = {label: b for label, b in unbounded.gpus[0][0].items if not label.startswith("KV budget")}
        return {"fits": fits, "graphs": graphs, "items": items, "request_kv_bytes": unbounded.request_kv_bytes,
                "allocated_peak_bytes": sum(b for k, b in items.items() if k != "CUDA context")
                + unbounded.request_kv_bytes}


class _KeepsDecoded(Timed):
    """`Timed`, keeping the last decoded image and the last input image's encodings (CPU copies)."""

    def reset(self) -> None:
        super().reset()
        self.encodings: dict[str, torch.Tensor] = {}

    def encode_vit(self, images):
        out = self.inner.encode_vit(images)
        self.encodings["vit"] = torch.cat(out).cpu()
        return out

    def encode_vae(self, pixels, noise):
        out = self.inner.encode_vae(pixels, noise)
        self.encodings["vae"] = out.cpu()
        return out

    def decode_latents(self, latent):
        self.decoded = super().decode_latents(latent)
        return self.decoded

class _GivenEncodings:
    """An executor whose ViT and VAE encoder return the given encodings (of one input image)."""

    def __init__(self, inner, encodings: dict[str, torch.Tensor]):
        self.inner, self.given = inner, encodings

    def encode_vit(self, images):
        assert len(images) == 1, "one input image"
        return [self.given["vit"].to(self.inner.device)]

    def encode_vae(self, pixels, noise):
        return self.given["vae"].to(self.inner.device)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _random_layer(config: BagelConfig, index: int, device, dtype) -> MoTDecoderLayer:
    """Decoder layer `index` with the weights `QuantBench.stage` gives it."""
    with torch.device("meta"):
        layer = MoTDecoderLayer(config.llm, index)
    layer = init_random_weights(layer.to_empty(device=device).to(torch.bfloat16), STAGE_SEED + 1 + index)
    return layer.to(dtype).requires_grad_(False)  # bf16 values (df11 stores those), in the run's dtype


def _grouped_weights(layer: MoTDecoderLayer):
    """(name, linear) of the weights as quantize_module stores them: q/k/v and gate/up fused."""
    out = []
    for expert, suffix in (("und", ""), ("gen", "_moe_gen")):
        attn, mlp = layer.self_attn, getattr(layer, f"mlp{suffix}")
        qkv = torch.cat([getattr(attn, f"{n}_proj{suffix}").weight for n in "qkv"])
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        out += [(f"{expert} qkv", Namespace(weight=qkv)), (f"{expert} o", getattr(attn, f"o_proj{suffix}")),
                (f"{expert} gate_up", Namespace(weight=gate_up)), (f"{expert} down", mlp.down_proj)]
    return out


def _dense(stored: torch.Tensor) -> torch.Tensor:
    """A stored weight back as the dense tensor its GEMM uses."""
    if isinstance(stored, Df11Tensor):
        return stored.dense()
    if hasattr(stored, "get_original_weight"):  # NF4
        return stored.get_original_weight()
    return stored.dequantize()


def _layouts(config: BagelConfig) -> dict:
    """The planner's choice for one, two and three 24 GB cards (the service's processes)."""
    out = {}
    for gpus in (1, 2, 3):
        try:
            plan = plan_memory(config, gpus, 24 * GiB)
            out[f"{gpus}x24GiB"] = {**plan.app_args(), "requests": plan.requests, "image_size": plan.image_size,
                                    "plan": plan.describe()}
        except Exception as e:
            out[f"{gpus}x24GiB"] = {"error": str(e)}
    return out


def _cuda_context_bytes(device: torch.device) -> int:
    """GPU memory this process uses beyond PyTorch's allocator (the CUDA context, libraries)."""
    torch.ones(1, device=device)  # initialise the context
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)  # the whole GPU: other processes would count too
    return total - free - torch.cuda.memory_reserved(device)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
