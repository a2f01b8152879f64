"""Step-level batching across requests (pipelines/batching.py): images per minute in this process
with batching on and off, with the full-size BAGEL-7B-MoT architecture and random bf16 weights
on the GPU (or a checkpoint), one stage.

    python -m bench.batching --out bench/results        # ~3-4 min on an H200

For each `--sizes` entry (size:steps) and each `--concurrency`, `--waves` x concurrency
text-to-image requests run closed-loop on that many threads (each starts its next request when
one ends), after one warm-up request per size; `--big` (1024:50 by default) runs one request
at concurrency 1 only, to show batching costs one request alone nothing. Each run reports images/min, seconds
and how many requests each denoising forward carried. `forward_ms` explains the scaling: the
time of one denoising forward of k branch segments of an image's tokens (k = 2: one guided
request), eager and as a replayed CUDA graph, so one sees where a forward stops being bound by
launching kernels and where the GPU is full (milliseconds per 1,000 tokens stop falling).
Writes batching.json (write_report) and batching.png (the charts) to --out; the last stdout
line is the JSON report.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bagel_model.kernels import select_kernels
from bagel_model.segments import Segment, image_block_len
from bench.latency import PROMPT, build, sync
from bench.provenance import commit, write_report
from pipelines.local import LocalExecutor
from pipelines.noise import NoiseSource
from pipelines.params import ImageParams
from pipelines.tasks import generate_image


def parse_runs(text: str) -> list[tuple[int, int]]:
    """"512:20,256:20" -> [(512, 20), (256, 20)] (size, num_timesteps)."""
    return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]


def throughput(executor: LocalExecutor, size: int, steps: int, concurrency: int, batching: bool,
               images: int) -> dict:
    """`images` text-to-image requests on `concurrency` threads, closed-loop."""
    batcher, sizes, lock = executor.batcher, Counter(), threading.Lock()

    def count(n: int) -> None:
        with lock:
            sizes[n] += 1

    params = ImageParams(height=size, width=size, num_timesteps=steps)
    executor.batcher = batcher if batching else None
    batcher.on_forward = count
    try:
        sync()
        t = time.perf_counter()
        with ThreadPoolExecutor(concurrency, thread_name_prefix="request") as pool:
            list(pool.map(lambda i: generate_image(executor, [f"{PROMPT} #{i}"], params, noise=NoiseSource(i)),
                          range(images)))
        sync()
        seconds = time.perf_counter() - t
    finally:
        executor.batcher, batcher.on_forward = batcher, None
    row = {"size": size, "steps": steps, "concurrency": concurrency, "batching": batching, "images": images,
           "seconds": seconds, "images_per_min": 60 * images / seconds,
           "requests_per_forward": {str(k): v for k, v in sorted(sizes.items())} if batching else None}
    print(json.dumps(row), flush=True)
    return row


def forward_ms(executor: LocalExecutor, size: int, counts: list[int], repeats: int) -> list[dict]:
    """Milliseconds of one denoising forward of k noise segments (each its own context, as k
    branches of k/2 guided requests) of a `size`² image, eager and replayed as a CUDA graph."""
    cfg, tok = executor.config, executor.tokenizer
    grid = cfg.latent_grid(size, size)
    ids = tok.text_block(tok.encode(PROMPT))
    contexts = [f"bench-forward/{i}" for i in range(max(counts))]
    executor.prefill([Segment.text(c, ids, 0) for c in contexts])
    latents = torch.randn(grid[0] * grid[1], cfg.patch_latent_dim)
    graphs = [r.denoise_graphs for r in executor.runners]
    rows = []
    try:
        for k in counts:
            segments = [Segment.noise(c, latents, grid, 0.5, len(ids)) for c in contexts[:k]]
            row = {"size": size, "segments": k, "tokens": k * image_block_len(grid[0] * grid[1])}
            for mode in ("eager", "graph"):
                if mode == "graph" and graphs[0] is None:
                    continue
                for g in graphs:
                    if g is not None:
                        g.enabled = mode == "graph"
                times = []
                for i in range(2 + repeats):  # the first two: warm-up (and, with graphs, the capture)
                    sync()
                    t = time.perf_counter()
                    executor._run(segments)
                    sync()
                    if i >= 2:
                        times.append(1000 * (time.perf_counter() - t))
                row[f"{mode}_ms"] = statistics.median(times)
                row[f"{mode}_ms_per_1k_tokens"] = row[f"{mode}_ms"] * 1000 / row["tokens"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        executor.free(contexts)
        for g in graphs:
            if g is not None:
                g.enabled = True
    return rows


def targets(rows: list[dict], top: int) -> dict:
    """Issue 14's targets where this run measured them: 512², 20 steps: >= 46 images/min at
    concurrency 8 (1.5x the 30.7 before batching); 256², 20 steps: concurrency 8 >= 2.5x
    concurrency 1; 1024², 50 steps, one request: batching on no slower than off (within 2%)."""
    def rate(size: int, steps: int, c: int, on: bool) -> float | None:
        return next((r["images_per_min"] for r in rows if (r["size"], r["steps"], r["concurrency"], r["batching"])
                     == (size, steps, c, on)), None)

    out = {}
    if top == 8 and rate(512, 20, 8, True):
        out["512_c8_at_least_46_images_per_min"] = rate(512, 20, 8, True) >= 46
    if top == 8 and rate(256, 20, 8, True) and rate(256, 20, 1, True):
        out["256_c8_at_least_2.5x_c1"] = rate(256, 20, 8, True) >= 2.5 * rate(256, 20, 1, True)
    if rate(1024, 50, 1, True) and rate(1024, 50, 1, False):
        out["1024_c1_on_within_2pct_of_off"] = rate(1024, 50, 1, True) >= 0.98 * rate(1024, 50, 1, False)
    return out


def chart(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (size, steps) in {(r["size"], r["steps"]) for r in report["throughput"] if r["concurrency"] > 1}:
        for batching, style in ((True, "-o"), (False, "--x")):
            rows = sorted((r for r in report["throughput"] if (r["size"], r["steps"], r["batching"])
                           == (size, steps, batching)), key=lambda r: r["concurrency"])
            left.plot([r["concurrency"] for r in rows], [r["images_per_min"] for r in rows], style,
                      label=f"{size}², {steps} steps, batching {'on' if batching else 'off'}")
    left.set(xlabel="concurrent requests", ylabel="images / min", title="throughput (1 stage)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for size in sorted({r["size"] for r in report["forward_ms"]}):
        rows = [r for r in report["forward_ms"] if r["size"] == size]
        for mode, style in (("graph", "-o"), ("eager", "--x")):
            if f"{mode}_ms" in rows[0]:
                right.plot([r["tokens"] for r in rows], [r[f"{mode}_ms_per_1k_tokens"] for r in rows], style,
                           label=f"{size}² segments, {mode}")
    right.set(xscale="log", xlabel="query tokens per forward", ylabel="ms per 1,000 tokens",
              title="one denoising forward")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle(f"step-level batching, {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: random full-size weights)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", default="512:20,256:20", help="size:num_timesteps, comma-separated")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--waves", type=int, default=2, help="requests per run: this many times the concurrency")
    p.add_argument("--big", default="1024:50", help="size:num_timesteps run at concurrency 1 only ('' : none)")
    p.add_argument("--forward-segments", default="1,2,4,8,16", help="segment counts of the forward timings")
    p.add_argument("--forward-repeats", type=int, default=5)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default="batching")
    args = p.parse_args(argv)
    t = time.perf_counter()
    kernels = select_kernels(args.device)  # the service's defaults
    executor = build(args.checkpoint, args.device, None, kernels)
    build_s = time.perf_counter() - t
    runs = parse_runs(args.sizes)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for size, steps in runs + parse_runs(args.big):
        throughput(executor, size, steps, 1, True, 1)  # warm-up: kernels, algorithms, allocator
        for c in concurrency if (size, steps) in runs else [1]:
            for batching in (False, True):
                rows.append(throughput(executor, size, steps, c, batching, c * args.waves if (size, steps) in runs
                                       else 1))
    counts = [int(k) for k in args.forward_segments.split(",")]
    forwards = [r for size, _ in runs for r in forward_ms(executor, size, counts, args.forward_repeats)]

    def rate(size: int, c: int, batching: bool) -> float | None:
        return next((r["images_per_min"] for r in rows if (r["size"], r["concurrency"], r["batching"])
                     == (size, c, batching)), None)

    top = max(concurrency)
    summary = {f"{size}": {"c1_on": rate(size, 1, True), "c1_off": rate(size, 1, False),
                           f"c{top}_on": rate(size, top, True), f"c{top}_off": rate(size, top, False),
                           f"c{top}_on_over_c1_on": (rate(size, top, True) or 0) / (rate(size, 1, True) or 1),
                           f"c{top}_on_over_off": (rate(size, top, True) or 0) / (rate(size, top, False) or 1)}
               for size, _ in runs + parse_runs(args.big)}
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    report = {"benchmark": "batching", "device": device, "torch": torch.__version__,
              "python": platform.python_version(), "commit": commit(),
              "weights": args.checkpoint or "random bf16 (full-size BAGEL-7B-MoT architecture)",
              "build_s": build_s, "settings": vars(args), "kernels": vars(kernels.choice),
              "max_batch_tokens": executor.batcher.max_batch_tokens, "batch_wait_s": executor.batcher.batch_wait_s,
              "summary": summary, "targets": targets(rows, top), "throughput": rows, "forward_ms": forwards}
    path = write_report(report, args.out, f"{args.name}.json")
    chart(report, path.with_suffix(".png"))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
