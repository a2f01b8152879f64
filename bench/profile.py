"""Where the time of one denoising forward goes, on one GPU: the full-size BAGEL-7B-MoT with random
bf16 weights, a 1024x1024 image's latents in the two text-CFG branches (the batched forward that
41 of the 49 text-to-image steps run).

- wall time per forward and achieved TFLOP/s against the FLOP model;
- a torch-profiler breakdown of GPU kernel time by kind (GEMM, attention, fused elementwise,
  eager elementwise, copies) and the top kernels;
- the kernel floor: the same GEMMs and attention calls timed alone, back to back;
- host enqueue time of a forward, and forwards run back to back without syncs;
- one decode step (batch 1, 100-token context): milliseconds per token end to end (with the
  argmax sync of every step) against the GPU kernel time of the step.

    python -m bench.profile --out bench/results [--compile]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bagel_model.config import BagelConfig
from bagel_model.cost import forward_flops, gemm_shapes
from bagel_model.demo import demo_tokenizer, random_module
from bagel_model.kernels import select_kernels
from bagel_model.model import BagelStage
from bagel_model.runner import StageRunner
from bagel_model.segments import Segment, image_block_len
from bagel_model.stage import full_model
from bench.kernel_args import add_kernel_args, kernel_choice
from bench.provenance import commit, write_report

PROMPT_TOKENS = 20
KINDS = [  # first match wins
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "sm90", "matmul")),
    ("fused elementwise (compiled)", ("triton",)),
    ("copy / index", ("copy", "index", "scatter", "gather", "cat", "memcpy", "memset", "fill")),
    ("eager elementwise", ("elementwise", "vectorized", "reduce", "unrolled")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def timed(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs (CUDA events)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_floor(config: BagelConfig, branches: int, query: int, context: int) -> dict:
    """Milliseconds of one forward's GEMMs and attention calls, each timed alone."""
    llm = config.llm
    d, hd, hq, hkv = llm.hidden_size, llm.head_dim, llm.num_attention_heads, llm.num_key_value_heads
    m = branches * query
    x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    gemm = {}
    for name, (k, n) in gemm_shapes(llm).items():
        a = x if k == d else torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        gemm[name] = timed(lambda: F.linear(a, w), 20) * llm.num_hidden_layers
    q = torch.randn(1, hq, query, hd, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, hkv, query + context, hd, device="cuda", dtype=torch.bfloat16)
    attention = timed(lambda: F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True), 20)
    attention *= branches * llm.num_hidden_layers
    return {"gemm_ms": gemm, "attention_ms": attention, "total_ms": sum(gemm.values()) + attention}


def kernel_times(prof) -> dict[str, list[float]]:
    """Kernel name -> [milliseconds, calls] of a CUDA profile."""
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0 and e.device_type.name == "CUDA":
            kernels[e.key][0] += t / 1000
            kernels[e.key][1] += e.count
    return kernels


def decode_profile(runner: StageRunner, context: int = 100, tokens: int = 64) -> dict:
    g = torch.Generator("cpu").manual_seed(1)
    runner.run([Segment.text("dec", torch.randint(0, 150000, (context,), generator=g), 0)])
    token = 0

    def step(i: int) -> None:
        nonlocal token
        token = int(runner.run([Segment.text("dec", [token], context + i, want_logits=True)])[0].argmax())

    for i in range(8):
        step(i)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(8, 8 + tokens):
        step(i)
    per_token = (time.perf_counter() - start) * 1000 / tokens
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(8 + tokens)
    runner.free(["dec"])
    gpu = sum(t for t, _ in kernel_times(prof).values())
    return {"context_tokens": context, "ms_per_token": per_token, "tokens_per_s": 1000 / per_token,
            "gpu_kernel_ms_per_token": gpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default="profile_denoise")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--compile", action="store_true", help="fused torch.compile'd elementwise kernels")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA graphs (decode steps, denoising forwards)")
    add_kernel_args(p)
    args = p.parse_args()
    config = BagelConfig()
    chosen = select_kernels("cuda", kernel_choice(args, args.compile))
    stage = random_module(lambda: BagelStage(config, full_model(config.llm.num_hidden_layers), chosen), "cuda",
                          torch.bfloat16, 0)
    runner = StageRunner(stage, demo_tokenizer().image_markers, graphs=not args.no_graphs)
    g = torch.Generator("cpu").manual_seed(0)
    runner.run([Segment.text("cond", torch.randint(0, 150000, (PROMPT_TOKENS,), generator=g), 0)])
    grid = config.latent_grid(args.size, args.size)
    x = torch.randn(grid[0] * grid[1], config.patch_latent_dim, generator=g).cuda()
    segments = [Segment.noise("cond", x, grid, 0.9, PROMPT_TOKENS), Segment.noise("cfg_text", x, grid, 0.9, 0)]
    query = image_block_len(grid[0] * grid[1])

    def forward():
        runner.run(segments)

    for _ in range(3):
        forward()
    ms = timed(forward, 10)
    flops = forward_flops(config.llm, query, PROMPT_TOKENS) + forward_flops(config.llm, query, 0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    forward()
    host_ms = (time.perf_counter() - start) * 1000
    torch.cuda.synchronize()
    pipelined_ms = timed(lambda: [forward() for _ in range(3)], 3) / 3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:  # host syncs inside one forward, by source line
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        forward()
        torch.cuda.set_sync_debug_mode("default")
    syncs = Counter(f"{Path(w.filename).name}:{w.lineno}: {str(w.message)[:80]}" for w in caught)
    kernels = kernel_times(prof)
    by_kind: dict[str, float] = defaultdict(float)
    for name, (t, _) in kernels.items():
        by_kind[kind_of(name)] += t
    busy = sum(by_kind.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:20]
    report = {
        "benchmark": "profile_denoise", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "commit": commit(), "weights": "random bf16 (full-size BAGEL-7B-MoT architecture)",
        "settings": {"size": args.size, "branches": 2, "prompt_tokens": PROMPT_TOKENS, "compile": args.compile,
                     "graphs": not args.no_graphs, "kernels": vars(chosen.choice)},
        "forward_ms": ms, "tflops": flops / ms / 1e9, "gpu_busy_ms": busy, "gpu_idle_ms": ms - busy,
        "host_enqueue_ms": host_ms, "back_to_back_forward_ms": pipelined_ms,
        "decode": decode_profile(runner),
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "host_syncs": dict(syncs.most_common()),
        "top_kernels": [{"name": n[:120], "ms": t, "calls": c, "kind": kind_of(n)} for n, (t, c) in top],
        "kernel_floor": kernel_floor(config, 2, query, PROMPT_TOKENS),
    }
    write_report(report, args.out, f"{args.name}.json")
    print(json.dumps({k: v for k, v in report.items() if k != "top_kernels"}, indent=1))
    for k in report["top_kernels"]:
        print(f"{k['ms']:8.2f} ms {k['calls']:5d}  {k['kind']:<28} {k['name']}")


if __name__ == "__main__":
    main()
