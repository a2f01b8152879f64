"""What automatic prefix caching saves (pipelines/prefix_cache.py), in this process, with the
full-size BAGEL-7B-MoT architecture and random bf16 weights on the GPU (or a checkpoint):

- chat: the time to the first token of a chat's second turn about a `--size`² image
  ([image, q1, a1, q2]), without the cache (every block prefilled, the ViT run) and with the
  first turn's prompt cached ([image, q1]: only a1 and q2 are prefilled);
- edit: the second edit of the same image with the same seed (the same posterior noise, so the
  image's VAE and ViT blocks are reused; only the new instruction is prefilled), without and with
  the cache, end to end.

    python -m bench.prefix_cache --out bench/results     # 1024x1024, 50 steps: ~2 min on an H200

Each measurement starts from the state it needs: with the cache, the cache holds exactly the
first turn (or the first edit's prompt, filled by a 2-step edit of that prompt: the cached
blocks do not depend on the steps). One warm-up each, then the median of --repeats. Checks that
the outputs with and without the cache are identical (token ids, latents), and whether the runs
without it agree with each other (if not, a kernel is nondeterministic and the comparison says
nothing; exit status 1 only for a difference that the control does not explain). The last
stdout line is the JSON report, also written to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from bagel_model.cost import kv_bytes_per_token
from bagel_model.kernels import select_kernels
from bench.latency import build, sync
from bench.provenance import commit, write_report
from pipelines.local import LocalExecutor
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS, TextParams
from pipelines.prefix_cache import PrefixCache
from pipelines.tasks import generate_image, understand

QUESTION = "What is in this picture? Describe it in detail."
ANSWER = "A photograph of a landscape with mountains, a lake and a forest under a cloudy sky."
FOLLOW_UP = "Which colours dominate the sky, and what time of day is it?"
EDITS = ("Make it night and add a full moon.", "Add a small red boat on the lake.")


def test_image(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((size, size), Image.BICUBIC)


def timed(run: Callable[[], object]) -> tuple[float, object]:
    sync()
    t = time.perf_counter()
    out = run()
    sync()
    return time.perf_counter() - t, out


def measure(executor: LocalExecutor, cache: PrefixCache, fill: Callable[[], object], run: Callable[[], object],
            cached: bool, repeats: int, warmup: int) -> tuple[list[float], list]:
    """Seconds of `run` per repeat (after `warmup`) and the outputs of every run; with the
    cache, emptied and then filled by `fill` before every run."""
    seconds, outs = [], []
    for i in range(warmup + repeats):
        executor.prefix_cache = cache if cached else None
        if cached:
            cache.clear()
            fill()
        s, out = timed(run)
        outs.append(out)
        if i >= warmup:
            seconds.append(s)
    executor.prefix_cache = None
    return seconds, outs


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: random full-size weights)")
    p.add_argument("--size", type=int, default=1024, help="the input image's side")
    p.add_argument("--steps", type=int, default=50, help="num_timesteps of the timed edits")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default="prefix_cache")
    args = p.parse_args(argv)
    t = time.perf_counter()
    kernels = select_kernels(args.device)  # the service's defaults
    executor = build(args.checkpoint, args.device, None, kernels)
    build_s = time.perf_counter() - t
    layers = max(len(c.layers) for c in executor.caches)
    cache = PrefixCache(executor, 8 * 2**30,
                        kv_bytes_per_token(executor.config.llm, executor.stages[0].dtype.itemsize, layers))
    image = test_image(args.size)
    first_token = TextParams(max_new_tokens=1)  # prefill + one token: the time to the first token

    turn1 = [image, QUESTION]
    turn2 = [image, QUESTION, ANSWER, FOLLOW_UP]
    chat, chat_outs = {}, {}
    for cached in (False, True):
        seconds, outs = measure(executor, cache, lambda: understand(executor, turn1, first_token),
                                lambda: understand(executor, turn2, first_token), cached, args.repeats, args.warmup)
        name = "cached" if cached else "uncached"
        chat[name] = {"ttft_s": _stats(seconds), "prompt_tokens": outs[-1].prompt_tokens,
                      "cached_tokens": outs[-1].cached_tokens}
        chat_outs[name] = [o.token_ids for o in outs]

    timed_params = replace(EDIT_DEFAULTS, num_timesteps=args.steps)
    fill_params = replace(EDIT_DEFAULTS, num_timesteps=2)
    edit, edit_outs = {}, {}
    for cached in (False, True):
        seconds, outs = measure(
            executor, cache, lambda: generate_image(executor, [image, EDITS[0]], fill_params, noise=NoiseSource(7)),
            lambda: generate_image(executor, [image, EDITS[1]], timed_params, noise=NoiseSource(7)),
            cached, args.repeats, args.warmup)
        name = "cached" if cached else "uncached"
        edit[name] = {"end_to_end_s": _stats(seconds), "prompt_tokens": outs[-1].prompt_tokens,
                      "cached_tokens": outs[-1].cached_tokens}
        edit_outs[name] = [o.latent for o in outs]
    # With vs without the cache; and, as the control, whether runs without it agree with each
    # other (a nondeterministic kernel, e.g. a cuDNN convolution chosen by timing, breaks both).
    identical = {"chat": chat_outs["cached"][-1] == chat_outs["uncached"][-1],
                 "edit": bool(torch.equal(edit_outs["cached"][-1], edit_outs["uncached"][-1]))}
    repeatable = {"chat": all(o == chat_outs["uncached"][0] for o in chat_outs["uncached"]),
                  "edit": all(torch.equal(o, edit_outs["uncached"][0]) for o in edit_outs["uncached"])}
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    report = {"benchmark": "prefix_cache", "device": device, "torch": torch.__version__,
              "python": platform.python_version(), "commit": commit(),
              "weights": args.checkpoint or "random bf16 (full-size BAGEL-7B-MoT architecture)",
              "build_s": build_s, "settings": vars(args), "kernels": vars(kernels.choice),
              "chat_second_turn": {**chat, "ttft_speedup": chat["uncached"]["ttft_s"]["median"]
                                   / chat["cached"]["ttft_s"]["median"]},
              "second_edit": {**edit, "saved_s": edit["uncached"]["end_to_end_s"]["median"]
                              - edit["cached"]["end_to_end_s"]["median"]},
              "identical": identical, "uncached_repeatable": repeatable, "cache": cache.stats()}
    write_report(report, args.out, f"{args.name}.json")
    print(json.dumps(report))
    return 0 if all(identical[k] or not repeatable[k] for k in identical) else 1


if __name__ == "__main__":
    raise SystemExit(main())
