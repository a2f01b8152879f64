"""Can any GEMM backend here beat the default one on the denoising forward's GEMMs?

The generation expert's four GEMMs at the t2i shape (two CFG branches of 4098 rows; the expert
runs on all rows), each timed alone with: cuBLAS (PyTorch's default), cuBLASLt, and
TorchInductor's max-autotune (which benchmarks its Triton GEMM templates against cuBLAS and
keeps the fastest). Also: the same shapes at M = 8192 (a multiple of every tile height), and
the down projection with its residual add fused into a Triton GEMM epilogue. cuBLAS is timed
again last: the difference between its two timings is the noise (clocks drift under load).
Inductor prints its autotuning table (every Triton config against cuBLAS) to stderr.

    python -m bench.gemm_search --out bench/results 2> bench/results/gemm_search_h100.log
"""
from __future__ import annotations

import argparse
import json
import math
import platform

import torch
import torch.nn.functional as F

from bagel_model.config import BagelConfig
from bagel_model.cost import gemm_shapes
from bagel_model.segments import image_block_len
from bench.profile import timed
from bench.provenance import commit, write_report


def tflops(m: int, k: int, n: int, ms: float) -> float:
    return 2 * m * k * n / ms / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default="gemm_search_h100")
    config = BagelConfig()
    side = config.max_image_side
    p.add_argument("--rows", type=int, default=2 * image_block_len(math.prod(config.latent_grid(side, side))),
                   help="GEMM rows (default: two CFG branches of the largest image's block)")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    results = {}
    for name, (k, n) in gemm_shapes(config.llm).items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        row = {}
        for m in (args.rows, args.rows // 128 * 128):
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row[f"cublas_m{m}"] = timed(lambda: F.linear(a, w), args.repeats)
        a = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        row["cublaslt"] = timed(lambda: F.linear(a, w), args.repeats)
        torch.backends.cuda.preferred_blas_library("cublas")
        torch._dynamo.reset()
        tuned = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
        tuned(a, w)
        row["max_autotune"] = timed(lambda: tuned(a, w), args.repeats)
        if name == "down":
            x = torch.randn(args.rows, n, device="cuda", dtype=torch.bfloat16)
            row["cublas_plus_add"] = timed(lambda: x + F.linear(a, w), args.repeats)
            fused = torch.compile(lambda a, w, x: x + F.linear(a, w), mode="max-autotune-no-cudagraphs", dynamic=False)
            fused(a, w, x)
            row["max_autotune_add_epilogue"] = timed(lambda: fused(a, w, x), args.repeats)
        row["cublas_again"] = timed(lambda: F.linear(a, w), args.repeats)  # clock drift between runs
        results[name] = {"k": k, "n": n, "ms": row,
                         "tflops": {key: tflops(int(key[8:]) if key.startswith("cublas_m") else args.rows, k, n, ms)
                                    for key, ms in row.items() if "add" not in key}}
        print(name, json.dumps(results[name]), flush=True)
    report = {"benchmark": "gemm_search", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "commit": commit(),
              "settings": {"rows": args.rows, "repeats": args.repeats, "dtype": "bfloat16"}, "results": results}
    write_report(report, args.out, f"{args.name}.json")


if __name__ == "__main__":
    main()
