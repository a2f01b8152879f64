"""In-process latency benchmark on one GPU: text-to-image, editing and understanding with the
full-size BAGEL-7B-MoT architecture and random bf16 weights made on the GPU (or a real checkpoint).

    python -m bench.latency --out bench/results [--tasks t2i,edit,understand] [--repeats 3]

Reports, with warm-up and repeats (median and spread): end-to-end, denoising and VAE-decode
seconds, peak GPU memory and achieved TFLOP/s against the FLOP model (bagel_model/cost.py);
understanding prefill seconds and decode tokens/s at batch 1 and 8. The last stdout line is the
JSON report, also written to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from bagel_model.config import BagelConfig
from bagel_model.cost import forward_flops
from bagel_model.demo import demo_tokenizer, random_module
from bagel_model.devices import default_dtype
from bagel_model.kernels import KernelChoice, Kernels, select_kernels
from bagel_model.model import BagelStage
from bagel_model.quantize import quantize_gen_mlp
from bagel_model.segments import Segment, image_block_len
from bagel_model.stage import full_model
from bagel_model.vae import AutoEncoder
from bagel_model.vit import VisionEncoder
from bench.kernel_args import add_kernel_args, apply_kernel_args
from bench.provenance import commit, write_report
from pipelines.context import Session
from pipelines.local import LocalExecutor
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS, ImageParams, TextParams
from pipelines.tasks import generate_image, understand

PROMPT = "A red fox sitting in a snowy forest at sunset, highly detailed, golden light."
EDIT_INSTRUCTION = "Make the sky purple and add a yellow moon."


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timed:
    """Wraps an executor: times the denoising loop (from the first denoise call to the VAE
    decode, so the steps themselves run without host syncs) and the VAE decode."""

    def __init__(self, inner: LocalExecutor):
        self.inner = inner
        self.config, self.tokenizer, self.device = inner.config, inner.tokenizer, inner.device
        self.reset()

    def reset(self) -> None:
        self.first_denoise = self.last_denoise = self.decode_s = None
        self.denoise_calls = []

    def denoise(self, segments, step):
        if self.first_denoise is None:
            sync()
            self.first_denoise = time.perf_counter()
        self.denoise_calls.append(len(segments))
        return self.inner.denoise(segments, step)

    def decode_latents(self, latent):
        sync()
        t = self.last_denoise = time.perf_counter()
        out = self.inner.decode_latents(latent)
        sync()
        self.decode_s = time.perf_counter() - t
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def build(checkpoint: str | None, device: str, graphs: bool | None, kernels: Kernels) -> LocalExecutor:
    """`graphs`: None is the executor's default (on for CUDA)."""
    if checkpoint:
        return LocalExecutor.from_checkpoint(checkpoint, device=device, dtype=default_dtype(device), graphs=graphs,
                                             kernels=kernels)
    config = BagelConfig()
    stage = random_module(lambda: BagelStage(config, full_model(config.llm.num_hidden_layers), kernels), device,
                          torch.bfloat16, 0)
    vision = random_module(lambda: VisionEncoder(config), device, torch.bfloat16, 1)
    vae = random_module(lambda: AutoEncoder(config.vae), device, torch.float32, 2)
    return LocalExecutor(config, demo_tokenizer(), [stage], vision, vae, graphs=graphs)


def image_flops(executor, tokens: int, contexts: list[int], calls: list[int]) -> float:
    """FLOPs of the denoising forwards that ran: `calls` holds the branch count of every step,
    `contexts` the cached length of each branch's context (COND, CFG_TEXT, CFG_IMG)."""
    return sum(forward_flops(executor.config.llm, tokens, contexts[b]) for n in calls for b in range(n))


def deviation(result, reference) -> dict:
    """How far an approximate run's output is from the exact run with the same noise."""
    a, b = result.latent.float().cpu(), reference.latent.float().cpu()
    pixels = np.asarray(result.image, dtype=np.float64) - np.asarray(reference.image, dtype=np.float64)
    mse = float((pixels ** 2).mean())
    return {"latent_relative_l2": float((a - b).norm() / b.norm()),
            "image_psnr_db": float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)}


def run_image(executor: Timed, items, params: ImageParams, repeats: int, warmup: int,
              tokens: int, contexts: list[int], exact=None) -> dict:
    """Time `generate_image`; FLOPs from the query block's `tokens` and each branch's context
    length. `exact`: the exact model's result for noise seed 0, to measure an approximation."""
    rows, extra = [], {}
    for i in range(warmup + repeats):
        executor.reset()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        result = generate_image(executor, items, params, noise=NoiseSource(i))
        sync()
        total = time.perf_counter() - t
        if i == 0 and exact is not None:
            extra["deviation_from_exact"] = deviation(result, exact)
        if i >= warmup:
            rows.append({"end_to_end_s": total, "denoise_s": executor.last_denoise - executor.first_denoise,
                         "vae_decode_s": executor.decode_s, "forwards": sum(executor.denoise_calls),
                         "peak_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0})
    calls = executor.denoise_calls
    flops = image_flops(executor, tokens, contexts, calls)
    denoise = _stats([r["denoise_s"] for r in rows])
    return {"runs": rows, **{k: _stats([r[k] for r in rows]) for k in ("end_to_end_s", "vae_decode_s")},
            "denoise_s": denoise, "forwards": rows[0]["forwards"],
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rows), "denoise_calls": calls,
            "settings": params.__dict__, "flop_model_pflop": flops / 1e15,
            "denoise_tflops": flops / denoise["median"] / 1e12, **extra}


def t2i_job(args) -> tuple[list, ImageParams]:
    params = replace(ImageParams(), num_timesteps=args.steps, height=args.size, width=args.size,
                     cfg_refresh_interval=args.cfg_refresh_interval)
    return [PROMPT], params


def edit_job(args) -> tuple[list, ImageParams]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    params = replace(EDIT_DEFAULTS, num_timesteps=args.steps, cfg_refresh_interval=args.cfg_refresh_interval)
    return [image, EDIT_INSTRUCTION], params


def denoise_shapes(config: BagelConfig, tokenizer, task: str, size: int) -> tuple[int, list[int]]:
    """The shapes of this benchmark's denoising forwards for `task` ("t2i" or "edit") at
    size x size: the tokens of one branch's noise block (latents and markers) and the cached
    context length of each branch (COND, CFG_TEXT, and CFG_IMG for editing)."""
    if task == "t2i":
        latent = image_block_len(math.prod(config.latent_grid(size, size)))
        return latent, [len(tokenizer.text_block(tokenizer.encode(PROMPT))), 0]
    (w, h), (vw, vh) = config.input_image_sizes(size, size)  # the edit's input image, resized
    latent = image_block_len(math.prod(config.latent_grid(h, w)))
    image = latent + image_block_len(math.prod(config.vit_grid(vh, vw)))  # VAE + ViT blocks
    prompt = len(tokenizer.text_block(tokenizer.encode(EDIT_INSTRUCTION)))
    return latent, [image + prompt, image, prompt]


def bench_t2i(executor, args, exact=None) -> dict:
    items, params = t2i_job(args)
    tokens, contexts = denoise_shapes(executor.config, executor.tokenizer, "t2i", args.size)
    return run_image(executor, items, params, args.repeats, args.warmup, tokens, contexts, exact)


def bench_edit(executor, args, exact=None) -> dict:
    items, params = edit_job(args)
    tokens, contexts = denoise_shapes(executor.config, executor.tokenizer, "edit", args.size)
    return run_image(executor, items, params, args.repeats, args.warmup, tokens, contexts, exact)


def bench_understand(executor, args, exact=None) -> dict:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    prefill = []
    for i in range(args.warmup + args.repeats):
        sync()
        t = time.perf_counter()
        understand(executor, [image, "What is in this picture?"], TextParams(max_new_tokens=1))
        sync()
        if i >= args.warmup:
            prefill.append(time.perf_counter() - t)
    decode = {str(b): _decode_rate(executor, b, args.decode_tokens) for b in (1, 8)}
    return {"prefill_s": _stats(prefill), "decode_tokens_per_s": decode}


def _decode_rate(executor, batch: int, tokens: int) -> dict:
    """Tokens per second of greedy decoding for `batch` contexts of a 100-token prompt."""
    tok = executor.tokenizer
    rates = []
    with Session(executor, "decode-bench") as session:
        contexts = [session.new(f"c{i}") for i in range(batch)]
        session.append_text(contexts, tok.encode("word " * 98))
        for _ in range(2):
            forks = [session.fork(c, "d") for c in contexts]
            ids = [tok.bos_id] * batch
            sync()
            t = time.perf_counter()
            for step in range(tokens):
                segs = [Segment.text(f.context_id, [i], f.rope_pos + step, want_logits=True) for f, i in zip(forks, ids)]
                logits = executor.decode(segs)
                ids = [int(l.argmax()) for l in logits]
            sync()
            rates.append(batch * tokens / (time.perf_counter() - t))
            for f in forks:
                session.release(f)
    return {"tokens_per_s": rates[-1], "per_sequence_tokens_per_s": rates[-1] / batch}


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="real checkpoint folder (default: random full-size weights)")
    p.add_argument("--tasks", default="t2i,edit,understand")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default="latency")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true", help="fused torch.compile'd elementwise kernels")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA graphs (decode steps, denoising forwards)")
    p.add_argument("--fp8", action="store_true", help="APPROXIMATE: FP8 GEMMs in the generation expert's MLP (fp8: true)")
    p.add_argument("--cfg-refresh-interval", type=int, default=1, metavar="K",
                   help="APPROXIMATE when > 1: run the guidance branches every K-th guided step only")
    add_kernel_args(p)
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    t = time.perf_counter()
    plain = select_kernels(args.device, KernelChoice(compile=args.compile))  # the exact run's kernels
    executor = Timed(build(args.checkpoint, args.device, False if args.no_graphs else None, plain))
    exact = {}
    other_kernels = (args.attention, args.mlp, args.norm) != ("sdpa", "cublas", "torch")
    if args.fp8 or args.cfg_refresh_interval > 1 or other_kernels:  # exact outputs first (noise seed 0)
        jobs = {"t2i": t2i_job, "edit": edit_job}
        for task in set(args.tasks.split(",")) & set(jobs):
            items, params = jobs[task](args)
            exact[task] = generate_image(executor, items, replace(params, cfg_refresh_interval=1),
                                         noise=NoiseSource(0))
    kernels = apply_kernel_args(args, executor.inner.stages, args.compile)  # then the chosen kernels
    if args.fp8:  # and quantise the same weights
        for stage in executor.inner.stages:
            quantize_gen_mlp(stage)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    report = {"benchmark": "latency", "device": device_name, "torch": torch.__version__,
              "python": platform.python_version(), "commit": commit(),
              "weights": args.checkpoint or "random bf16 (full-size BAGEL-7B-MoT architecture)",
              "build_s": time.perf_counter() - t, "settings": vars(args),
              "kernels_in_effect": kernels, "results": {}}
    benches = {"t2i": bench_t2i, "edit": bench_edit, "understand": bench_understand}
    for task in args.tasks.split(","):
        report["results"][task] = benches[task](executor, args, exact.get(task))
        print(task, json.dumps({k: v for k, v in report["results"][task].items() if k != "runs"}), flush=True)
    write_report(report, args.out, f"{args.name}.json")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
