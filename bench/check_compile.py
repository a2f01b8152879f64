"""Checks on the GPU that the optimised paths give the unoptimised numbers: one denoising
forward (1024x1024 latents, two CFG branches) of a full-width BAGEL stage with random bf16
weights, eager vs `compile_elementwise()`; prints and writes the deviation.

    python -m bench.check_compile --out bench/results [--layers 4]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bagel_model import layers
from bagel_model.config import BagelConfig
from bagel_model.demo import random_module
from bagel_model.kv_cache import KVCache
from bagel_model.model import BagelStage
from bagel_model.segments import PackedLayout, Segment
from bagel_model.stage import StageSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    config = BagelConfig()
    stage = random_module(lambda: BagelStage(config, StageSpec(0, 1, range(args.layers))), "cuda", torch.bfloat16, 0)
    # A 1-stage model of `layers` layers: first and last stage at once.
    generator = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(4096, 64, generator=generator).cuda()
    cache = KVCache(stage.stage.layers)
    prompt = Segment.text("cond", torch.randint(0, 1000, (30,), generator=generator), 0)
    layout = PackedLayout.build([prompt], torch.device("cuda"))
    with torch.inference_mode():
        stage(stage.embed([prompt], 151652, 151653), layout, cache)
        segments = [Segment.noise("cond", x, (64, 64), 0.9, 30), Segment.noise("cfg_text", x, (64, 64), 0.9, 0)]
        layout = PackedLayout.build(segments, torch.device("cuda"))

        def forward():
            hidden = stage(stage.embed(segments, 151652, 151653), layout, cache)
            return torch.stack(stage.heads(hidden, layout)).float()

        eager = forward()
        layers.compile_elementwise()
        compiled = forward()
    diff = (compiled - eager).abs()
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "layers": args.layers,
              "max_abs_diff": diff.max().item(), "max_abs_value": eager.abs().max().item(),
              "relative_l2": ((compiled - eager).norm() / eager.norm()).item()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check_compile.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
