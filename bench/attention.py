"""Attention kernels for BAGEL's denoising shape on this GPU: TFLOP/s of SDPA variants for a
1024x1024 image's (the largest) non-causal block over a cache (BAGEL-7B-MoT's heads, bf16).

    python -m bench.attention --out bench/results
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bagel_model.config import BagelConfig
from bagel_model.segments import image_block_len
from bench.provenance import write_report


def time_s(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    config = BagelConfig()
    llm = config.llm
    hq, hkv, d = llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim
    rows, cols = config.latent_grid(config.max_image_side, config.max_image_side)
    lq, groups = image_block_len(rows * cols), hq // hkv
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "variants": {}}
    for context in (0, 90, 9020):
        lk = lq + context
        q = torch.randn(1, hq, lq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, lk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flops = 4 * lq * lk * d * hq

        def expanded():  # K/V repeated for every query head, inside the timed call
            return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))

        variants = {
            "expand_kv+default": expanded,
            "enable_gqa+default": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        }
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            for gqa in (False, True):
                def fn(backend=backend, gqa=gqa):
                    with sdpa_kernel(backend):
                        if gqa:
                            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                        return expanded()
                variants[f"{name}{'+gqa' if gqa else '+expand_kv'}"] = fn
        for name, fn in variants.items():
            try:
                s = time_s(fn)
                results["variants"][f"{name}@ctx{context}"] = {"ms": s * 1e3, "tflops": flops / s / 1e12}
            except Exception as e:  # a backend that does not support this shape
                results["variants"][f"{name}@ctx{context}"] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    write_report(results, args.out, "attention.json")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
