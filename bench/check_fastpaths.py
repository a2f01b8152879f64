"""Checks on the GPU that the fast paths give the plain path's numbers, on a full-width BAGEL
stage (`--layers` layers) with random bf16 weights:

- denoising forward (1024x1024 latents, two CFG branches): bf16 eager and bf16 with the
  compiled elementwise kernels, each against a float32 eager forward of the same weights, and
  the same forward captured as a CUDA graph and replayed twice against its eager run;
- decoding: 32 teacher-forced steps of the CUDA-graph fast path (static K/V slots) against the
  packed path, both bf16, and both against float32;
- with --attention / --mlp (bagel_model/kernels.py): the denoising forward with those
  kernels on top of the compiled ones, against float32, and its graph replays.

    python -m bench.check_fastpaths --out bench/results [--layers 4] [--attention fa4 --mlp quack --site /tmp/site]
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

from bagel_model.config import BagelConfig
from bagel_model.demo import demo_tokenizer, random_module
from bagel_model.kernels import EAGER, KernelChoice, Kernels, select_kernels
from bagel_model.model import BagelStage
from bagel_model.runner import StageRunner
from bagel_model.segments import Segment
from bagel_model.stage import StageSpec
from bench.kernel_args import add_kernel_args, apply_kernel_args
from bench.provenance import commit, write_report

MARKERS = demo_tokenizer().image_markers  # random weights: any tokenizer's ids will do


def deviation(x: torch.Tensor, reference: torch.Tensor) -> dict:
    x, reference = x.float(), reference.float()
    return {"max_abs_diff": (x - reference).abs().max().item(), "max_abs_value": reference.abs().max().item(),
            "relative_l2": ((x - reference).norm() / reference.norm()).item()}


def denoise(stage: BagelStage, prompt: torch.Tensor, x: torch.Tensor, calls: int = 1) -> list[torch.Tensor]:
    """The two-branch forward's velocities, `calls` times on one runner: with CUDA graphs the
    first call runs eagerly, the second is captured and replayed, later ones replay."""
    runner = StageRunner(stage, MARKERS)
    runner.run([Segment.text("cond", prompt, 0)])
    side = stage.config.max_image_side
    grid = stage.config.latent_grid(side, side)
    segments = [Segment.noise("cond", x, grid, 0.9, len(prompt)), Segment.noise("cfg_text", x, grid, 0.9, 0)]
    return [torch.stack(runner.run(segments)).float() for _ in range(calls)]


def decode(stage: BagelStage, prompt: torch.Tensor, tokens: torch.Tensor, slots: int) -> torch.Tensor:
    """Logits of teacher-forced decoding steps after the prompt."""
    runner = StageRunner(stage, MARKERS, decode_slots=slots)
    runner.run([Segment.text("c", prompt, 0)])
    n = len(prompt)
    return torch.stack([runner.run([Segment.text("c", [int(t)], n + i, want_logits=True)])[0] for i, t in enumerate(tokens)]).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default="check_fastpaths")
    add_kernel_args(p)
    args = p.parse_args()
    config = BagelConfig()

    def build(kernels: Kernels) -> BagelStage:  # the same random weights each time
        spec = StageSpec(0, 1, range(args.layers))
        return random_module(lambda: BagelStage(config, spec, kernels), "cuda", torch.bfloat16, 0)

    stage = build(EAGER)
    reference = copy.deepcopy(stage).float()
    g = torch.Generator("cpu").manual_seed(0)
    prompt = torch.randint(0, 150000, (30,), generator=g)
    rows, cols = config.latent_grid(config.max_image_side, config.max_image_side)
    x = torch.randn(rows * cols, config.patch_latent_dim, generator=g).cuda()
    tokens = torch.randint(0, 150000, (32,), generator=g)

    fp32_denoise = denoise(reference, prompt, x)[0]
    fp32_decode = decode(reference, prompt, tokens, slots=0)
    eager_denoise = denoise(stage, prompt, x)[0]
    del stage
    stage = build(select_kernels("cuda", KernelChoice(compile=True)))
    compiled_denoise, *replayed = denoise(stage, prompt, x, calls=3)
    packed_decode = decode(stage, prompt, tokens, slots=0)
    graph_decode = decode(stage, prompt, tokens, slots=8)
    report = {
        "benchmark": "check_fastpaths", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "commit": commit(), "layers": args.layers, "weights": "random bf16, full width",
        "denoise": {"eager_bf16_vs_fp32": deviation(eager_denoise, fp32_denoise),
                    "compiled_bf16_vs_fp32": deviation(compiled_denoise, fp32_denoise),
                    "compiled_vs_eager_bf16": deviation(compiled_denoise, eager_denoise),
                    "graph_replays_vs_compiled_eager_bf16": [deviation(r, compiled_denoise) for r in replayed]},
        "decode": {"packed_bf16_vs_fp32": deviation(packed_decode, fp32_decode),
                   "graph_bf16_vs_fp32": deviation(graph_decode, fp32_decode),
                   "graph_vs_packed_bf16": deviation(graph_decode, packed_decode),
                   "argmax_agreement": (graph_decode.argmax(-1) == packed_decode.argmax(-1)).float().mean().item()},
    }
    if (args.attention, args.mlp, args.norm) != ("sdpa", "cublas", "torch"):
        report["kernels_in_effect"] = apply_kernel_args(args, [stage], compile=True)[0]
        kernel_denoise, *replayed = denoise(stage, prompt, x, calls=3)
        report["denoise"] |= {"kernels_bf16_vs_fp32": deviation(kernel_denoise, fp32_denoise),
                              "kernels_vs_compiled_bf16": deviation(kernel_denoise, compiled_denoise),
                              "graph_replays_vs_kernels_eager_bf16": [deviation(r, kernel_denoise) for r in replayed]}
    write_report(report, args.out, f"{args.name}.json")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
