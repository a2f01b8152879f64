"""The memory planner (bagel_model/memory_plan.py): its arithmetic against real allocations on
the CPU, and the layouts it picks for 24 and 80 GB cards.

Measured on the CPU (float32): one decoder-layer forward's activations 1.00-1.03x the formula
after a first forward (the first also fuses q/k/v and gate/up); an edit's KV cache equals the
formula; a VAE decode 1.3-2.0x the formula's live tensors (CPU convolutions reorder their
inputs; GPUs use cuDNN workspaces instead: bench/quant.py measures those).
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from bagel_model.config import BagelConfig, LLMConfig
from bagel_model.demo import demo_config, demo_tokenizer, random_module, write_config_folder
from bagel_model.errors import InvalidRequest
from bagel_model.kv_cache import KVCache
from bagel_model.loader import load_stage
from bagel_model.memory_plan import (AUTO_MODES, GiB, Workload, forward_activation_bytes, forward_tokens,
                                     plan_memory, request_kv_bytes, stage_weight_bytes, vae_decode_bytes,
                                     vision_weight_bytes, vocabulary_transient_bytes)
from bagel_model.model import BagelStage
from bagel_model.quantize import MODES, weight_bytes
from bagel_model.segments import PackedLayout, Segment
from bagel_model.stage import full_model, split_layers
from bagel_model.vae import AutoEncoder
from cluster.args import AppArgs, approximate_modes
from cluster.plan import with_plan
from pipelines.local import LocalExecutor
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS
from pipelines.tasks import generate_image

FULL = BagelConfig()
KEYS = "bagel-7b-mot-keys.json"


def allocated_peak(fn) -> int:
    """Peak of the bytes the CPU allocator handed out while `fn` ran, above where it started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# -- arithmetic against real allocations -------------------------------------------------


def test_weights_equal_the_released_checkpoint(fixture_dir):
    """Full size, bf16: the LLM stages and the ViT add up to every tensor of the released
    ema.safetensors (the key list of the official module tree)."""
    entries = json.loads((fixture_dir.parent / KEYS).read_text())["ema.safetensors"]
    released = sum(math.prod(shape) * 2 for shape, dtype in entries.values())
    stages = sum(stage_weight_bytes(FULL, s, None) for s in split_layers(28, 3))
    assert stages == stage_weight_bytes(FULL, full_model(28), None)
    assert stages + vision_weight_bytes(FULL, None) == released


@pytest.mark.parametrize("mode", (None, *MODES))
def test_weights_equal_a_loaded_stage(mode, checkpoint_dir):
    config = BagelConfig.from_checkpoint_dir(checkpoint_dir)
    for spec in split_layers(config.llm.num_hidden_layers, 2):
        stage = load_stage(checkpoint_dir, config, spec, dtype=torch.bfloat16, quantize=mode)
        planned, actual = stage_weight_bytes(config, spec, mode), weight_bytes(stage)
        if mode == "df11":  # its size depends on the values; the planner uses the expected ratio
            assert abs(planned - actual) < 0.03 * actual, (planned, actual)
        else:
            assert planned == actual, (planned, actual)


def test_forward_activations_match_the_formula():
    tokenizer = demo_tokenizer()
    config = replace(demo_config(vocab_size=len(tokenizer)), llm=LLMConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer)))
    stage = random_module(lambda: BagelStage(config, full_model(2)), "cpu", torch.float32, 0)
    for size, branches in ((128, 3), (256, 1), (256, 3)):
        grid = size // config.latent_downsample
        segments = [Segment.noise(f"c{b}", torch.randn(grid * grid, config.patch_latent_dim), (grid, grid), 0.5, 0)
                    for b in range(branches)]
        with torch.inference_mode():
            hidden = stage.embed(segments, 1, 2)
            layout = PackedLayout.build(segments, torch.device("cpu"))
            stage(hidden, layout, KVCache(range(2)))  # the first forward fuses q/k/v and gate/up
            measured = allocated_peak(lambda: stage(hidden, layout, KVCache(range(2))))
        planned = forward_activation_bytes(config, forward_tokens(config, size, branches), dtype_bytes=4)
        assert 1.0 <= planned / measured < 1.1, (size, branches, planned, measured)


def test_edit_kv_cache_matches_the_formula(checkpoint_dir):
    executor = LocalExecutor.from_checkpoint(checkpoint_dir, dtype=torch.float32)
    most = []
    denoise = executor.denoise

    def measuring(segments, step):
        most.append(sum(cache.nbytes() for cache in executor.caches))
        return denoise(segments, step)

    executor.denoise = measuring
    config = executor.config
    for size, prompt in ((64, "make it night"), (128, "make it night " * 20)):
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
        most.clear()
        generate_image(executor, [image, prompt], replace(EDIT_DEFAULTS, num_timesteps=3), noise=NoiseSource(1))
        tokens = len(executor.tokenizer.encode(prompt))
        assert max(most) == request_kv_bytes(config, size, tokens, config.llm.num_hidden_layers, dtype_bytes=4)


def test_vae_decode_formula_counts_the_live_tensors():
    config = BagelConfig()
    config = replace(config, vae=replace(config.vae, ch=32))  # the released shape, narrower
    vae = random_module(lambda: AutoEncoder(config.vae), "cpu", torch.float32, 0)
    z = torch.randn(1, config.vae.z_channels, 8, 8)
    with torch.inference_mode():
        vae.decode(z)
        measured = allocated_peak(lambda: vae.decode(z))
    assert 1.0 <= measured / vae_decode_bytes(config, 64) < 2.2


# -- layouts -------------------------------------------------------------------------------


def test_three_24gb_cards_run_exact_weights_in_three_stages():
    plan = plan_memory(FULL, 3, 24 * GiB)
    assert (plan.num_stages, plan.quantize, sum(plan.layer_sizes)) == (3, None, 28)
    assert plan.layer_sizes[0] < min(plan.layer_sizes[1:])  # GPU 0 also hosts the encoder and decoder
    assert plan.requests >= 4
    for procs in plan.gpus:
        assert sum(p.bytes for p in procs) <= 24 * GiB


def test_two_24gb_cards_run_exact_weights_in_two_stages():
    plan = plan_memory(FULL, 2, 24 * GiB)
    assert (plan.num_stages, plan.quantize) == (2, None) and plan.requests >= 1


def test_one_80gb_card_runs_exact_weights_in_one_stage():
    plan = plan_memory(FULL, 1, 80 * GiB, Workload(concurrency=8))
    assert (plan.num_stages, plan.quantize) == (1, None) and plan.requests >= 8
    spare = plan_memory(FULL, 2, 80 * GiB)
    assert spare.num_stages == 1 and [p.name for p in spare.gpus[1]] == ["encoder", "decoder"]


def test_one_24gb_card_takes_the_first_format_that_fits():
    """auto goes exact, df11, int8, nf4: the choice fits and every format before it does not."""
    for processes in ("serve", "local"):
        plan = plan_memory(FULL, 1, 24 * GiB, processes=processes)
        assert plan.quantize in ("df11", "int8", "nf4") and plan.requests >= 1
        for earlier in AUTO_MODES[:AUTO_MODES.index(plan.quantize)]:
            with pytest.raises(InvalidRequest, match="no layout fits"):
                plan_memory(FULL, 1, 24 * GiB, quantize=earlier, processes=processes)
    small = plan_memory(FULL, 1, 24 * GiB, Workload(image_size=512), processes="local")
    assert small.quantize == "df11"  # lossless fits one card at 512x512


def test_one_24gb_card_runs_lossless_weights_in_one_process_without_graphs():
    """The CLI's one process at the largest size: df11 (its vocabulary compressed too, the VAE
    decode after the request's KV is freed), with CUDA graphs off because their pool would not
    fit beside it; at 512x512 the graphs fit as well. The service cannot turn graphs off."""
    plan = plan_memory(FULL, 1, 24 * GiB, processes="local")
    assert (plan.quantize, plan.graphs) == ("df11", False) and plan.requests >= 1
    assert "CUDA graphs off" in plan.describe() and "CUDA-graph pool" not in plan.describe()
    with pytest.raises(InvalidRequest, match="no layout fits"):
        plan_memory(FULL, 1, 24 * GiB, quantize="df11", processes="local", graphs=True)
    small = plan_memory(FULL, 1, 24 * GiB, Workload(image_size=512), processes="local")
    assert (small.quantize, small.graphs) == ("df11", True)
    with pytest.raises(InvalidRequest, match="always captures CUDA graphs"):
        plan_memory(FULL, 1, 24 * GiB, graphs=False)


def test_df11_counts_its_vocabulary_compressed_and_decoded():
    """With df11 the token embedding and LM head are stored at the df11 ratio, and the stage
    holding them plans for one of them decompressed whole."""
    vocab = FULL.llm.vocab_size * FULL.llm.hidden_size
    first, middle = split_layers(28, 3)[:2]
    saved = stage_weight_bytes(FULL, first, None) - stage_weight_bytes(FULL, first, "df11")
    saved_middle = stage_weight_bytes(FULL, middle, None) - stage_weight_bytes(FULL, middle, "df11")
    assert 0.25 * 2 * vocab < saved - saved_middle * len(first.layers) / len(middle.layers) < 0.35 * 2 * vocab
    assert vocabulary_transient_bytes(FULL, first, "df11") == 2 * vocab
    assert vocabulary_transient_bytes(FULL, middle, "df11") == 0 == vocabulary_transient_bytes(FULL, first, "int8")


def test_impossible_requests_name_what_would_fit():
    with pytest.raises(InvalidRequest, match=r"no layout fits 64 concurrent 1024x1024.*nf4 weights in 1 stage\(s\), "
                                             r"holds [1-9] such request"):
        plan_memory(FULL, 1, 24 * GiB, Workload(concurrency=64))
    with pytest.raises(InvalidRequest, match=r"one request fits at \d+x\d+ with nf4"):
        plan_memory(FULL, 1, 16 * GiB)
    with pytest.raises(InvalidRequest, match="3 stages need as many GPUs"):
        plan_memory(FULL, 2, 24 * GiB, num_stages=3)


def test_the_plan_prints_its_arithmetic():
    text = plan_memory(FULL, 3, 24 * GiB).describe()
    for needle in ("3 stages on 3 GPUs of 24.00 GiB", "GPU 2:", "weights", "activations", "CUDA context",
                   "encoder", "decoder", "VAE decode", "KV budget per stage"):
        assert needle in text


# -- the service's auto config -------------------------------------------------------------


def test_auto_config_takes_the_plan(tmp_path):
    folder = write_config_folder(tmp_path / "bagel", FULL, demo_tokenizer())
    args = AppArgs(checkpoint_dir=str(folder), num_stages="auto", quantize="auto", gpu_memory_gib=24)
    planned, plan = with_plan(args, 3)
    assert (planned.num_stages, planned.quantize, planned.layer_sizes) == (3, None, plan.layer_sizes)
    # the planned KV room is shared with the prefix cache, which gets at most a quarter of it
    assert planned.kv_cache_bytes + planned.prefix_cache_bytes == plan.kv_cache_bytes
    assert 0 < planned.prefix_cache_bytes <= plan.kv_cache_bytes // 4 < planned.kv_cache_bytes
    uncached, _ = with_plan(args.model_copy(update={"prefix_cache": False}), 3)
    assert uncached.kv_cache_bytes == plan.kv_cache_bytes
    one, plan = with_plan(args, 1)
    assert one.quantize in ("df11", "int8", "nf4") and one.num_stages == 1
    cpu, plan = with_plan(args, 0)
    assert (cpu.num_stages, cpu.quantize, plan) == (1, None, None)
    fixed = AppArgs(checkpoint_dir=str(folder), num_stages=1, gpu_memory_gib=24)  # too big: warned, kept
    kept, plan = with_plan(fixed, 1)
    assert (kept.num_stages, kept.quantize, plan) == (1, None, None)


def test_health_lists_approximate_modes_only():
    assert approximate_modes(AppArgs(quantize="df11")) == []
    assert approximate_modes(AppArgs(quantize="int8")) == ["int8"]
    assert approximate_modes(AppArgs(fp8=True)) == ["fp8"]
    with pytest.raises(ValueError, match="choose one"):
        AppArgs(quantize="int8", fp8=True)
