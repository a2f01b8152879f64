"""The timing-faithful simulation: the cost arithmetic, the hardware profiles' calibration, the
simulated runner / ViT / VAE (shapes, KV bookkeeping, sleeping), the analytic model, and a small
simulated Serve app (time scale 0.01) through HTTP."""
from __future__ import annotations

import json
import time

import httpx
import pytest
import torch
from PIL import Image

from bagel_model import cost
from bagel_model.config import BagelConfig
from bagel_model.demo import demo_tokenizer
from bagel_model.hardware import RESULTS, Block, load_profile
from bagel_model.latent_rgb import fit_latent_rgb
from bagel_model.segments import Segment
from bagel_model.simulated import (SimulatedAutoEncoder, SimulatedKVCache, SimulatedRunner, SimulatedVisionEncoder,
                                   Simulation)
from bagel_model.stage import split_layers
from bench import simulate
from bench.event_sim import Model, Topology, summarize, trace

from .service_app import data_url, png_bytes, running_app, sse_events

FULL = BagelConfig()
LLM = FULL.llm


@pytest.fixture(scope="module")
def h200():
    return load_profile("h200")


def _measured(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


# -- cost model ---------------------------------------------------------------------------------

def test_flop_counts():
    assert cost.forward_flops(LLM, 4098, 20) == cost.gemm_flops(LLM, 4098, 28) + cost.attention_flops(LLM, 4098, 20, 28)
    assert cost.gemm_flops(LLM, 10, 3) == 3 * cost.gemm_flops(LLM, 10)
    # Counted once with torch.utils.flop_counter on meta tensors of the released modules (too slow for the suite).
    assert cost.vae_decode_flops(FULL.vae, 1024, 1024) == 10_472_204_009_472
    assert cost.vae_encode_flops(FULL.vae, 1024, 1024) == 4_882_572_509_184
    assert sum(cost.vit_flops(FULL.vit, LLM.hidden_size, [70 * 70])) == 6_928_859_033_600
    assert cost.expert_weight_bytes(LLM) == 2 * cost.linear_macs_per_token(LLM)
    assert cost.kv_bytes_per_token(LLM, layers=14) * 2 == cost.kv_bytes_per_token(LLM) == 57344


def test_h200_profile_reproduces_its_calibration(h200):
    """Derived from bench/results: the model gives back the measured forward, decode step,
    text-to-image denoising loop and VAE decode."""
    profiled, latency = _measured("profile_denoise_h200.json"), _measured("latency_compiled_h200.json")
    forward = [Block(4098, 20, latent=True, noise=True), Block(4098, 0, latent=True, noise=True)]
    assert h200.forward_s(LLM, forward, 28, last=False) * 1e3 == pytest.approx(profiled["forward_ms"])
    step = [Block(1, profiled["decode"]["context_tokens"], logits=True)]
    assert h200.forward_s(LLM, step, 28, last=True) * 1e3 == pytest.approx(profiled["decode"]["ms_per_token"])
    t2i = latency["results"]["t2i"]
    assert h200.vae_decode_s(FULL, 1024, 1024) == pytest.approx(t2i["vae_decode_s"]["median"])
    loop = sum(h200.forward_s(LLM, forward[:n], 28, last=True) for n in t2i["denoise_calls"])
    assert loop == pytest.approx(t2i["denoise_s"]["median"])
    assert "gemm_tflops" in h200.summary()["derivation"]


def test_h200_profile_predicts_what_it_was_not_fitted_to(h200):
    """Editing (3 branches, 9k-token contexts, VAE and ViT encode) and batch-8 decoding."""
    edit = summarize(Model(FULL, h200, Topology()).run({"edit": trace(FULL, demo_tokenizer(), "edit", 1024)},
                                                       ["edit"], 1), 1)
    measured = _measured("latency_compiled_h200.json")["results"]
    assert edit["latency_s"]["p50"] == pytest.approx(measured["edit"]["end_to_end_s"]["median"], rel=0.05)
    batch8 = 8 / h200.forward_s(LLM, [Block(1, 100, logits=True)] * 8, 28, last=True)
    assert batch8 == pytest.approx(measured["understand"]["decode_tokens_per_s"]["8"]["tokens_per_s"], rel=0.10)


def test_rtx4090_profile_scales_the_h200_by_public_peaks(h200):
    rtx = load_profile("rtx4090")
    assert rtx.gemm_flops_per_s == pytest.approx(h200.gemm_flops_per_s * 165.2 / 989.4)
    assert rtx.vae_flops_per_s == pytest.approx(h200.vae_flops_per_s * 82.6 / 494.7)
    assert rtx.memory_bytes == 24 * 2**30 and rtx.link.copies == 2
    hidden = rtx.hidden_bytes(LLM, 4098)  # one branch's hidden states, bf16
    assert rtx.link.seconds(hidden) == pytest.approx(10e-6 + 2 * hidden / 25e9)
    assert h200.link.seconds(hidden) < rtx.link.seconds(hidden) / 10
    with pytest.raises(ValueError, match="unknown hardware profile"):
        load_profile("tpu")


# -- simulated components -----------------------------------------------------------------------

def test_simulated_kv_cache_shares_forks_like_the_real_cache():
    cache = SimulatedKVCache(range(2), bytes_per_token=10)
    cache.append("a", 5)
    cache.fork("a", "b")
    assert cache.length("b") == 5 and cache.nbytes() == 50  # shared until one appends
    cache.append("b", 3)
    assert (cache.length("a"), cache.length("b"), cache.nbytes()) == (5, 8, 130)
    with pytest.raises(ValueError, match="already exists"):
        cache.fork("a", "b")
    cache.free(["a", "b", "unknown"])
    assert cache.context_ids() == [] and cache.nbytes() == 0


def test_simulated_stages_return_the_right_shapes_and_sleep(h200):
    scale = 0.5
    sim = Simulation(h200, time_scale=scale)
    first, last = (SimulatedRunner(FULL, spec, sim, torch.bfloat16) for spec in split_layers(28, 2))
    prompt = [Segment.text("c", list(range(20)), 0)]
    hidden = first.run(prompt)
    assert hidden.shape == (20, 1) and hidden.dtype == torch.bfloat16  # rows real, one feature column
    assert last.run(prompt, hidden) == [None]
    assert first.cache.length("c") == last.cache.length("c") == 20
    assert last.cache.nbytes() == 20 * cost.kv_bytes_per_token(LLM, layers=14)
    with pytest.raises(ValueError, match="do not fit"):
        last.run(prompt, torch.zeros(19, 1))
    grid, x = (64, 64), torch.zeros(4096, FULL.patch_latent_dim)
    step = [Segment.noise("c", x, grid, 0.9, 20), Segment.noise("u", x, grid, 0.9, 0),
            Segment.text("d", [1], 0, want_logits=True)]
    t = time.perf_counter()
    hidden = first.run(step)
    outputs = last.run(step, hidden)
    last.synchronize()  # the last stage's outputs may stay on the simulated GPU: reading them waits
    elapsed = time.perf_counter() - t
    assert [tuple(o.shape) for o in outputs] == [(4096, 64), (4096, 64), (LLM.vocab_size,)]
    blocks = [Block(4098, 20, True, noise=True), Block(4098, 0, True, noise=True), Block(1, 0, logits=True)]
    hop = h200.link.seconds(h200.hidden_bytes(LLM, 8197))
    expected = h200.forward_s(LLM, blocks, 14, last=False) + h200.forward_s(LLM, blocks, 14, last=True) + hop
    assert expected * scale <= elapsed < 2 * expected * scale + 1.0  # slack for a loaded CPU
    assert last.busy_s == pytest.approx((last.compute_s + last.link_s) * scale)
    slow = SimulatedRunner(FULL, split_layers(28, 1)[0], Simulation(h200, time_scale=10.0), torch.bfloat16)
    t = time.perf_counter()
    slow.run(step)  # ~2 s of simulated GPU work at this scale: the call returns once it is queued
    queued = time.perf_counter() - t
    slow.synchronize()
    assert queued < 0.5 * slow.busy_s <= 0.5 * (time.perf_counter() - t) + 0.1
    assert last.link_s == pytest.approx(h200.link.seconds(h200.hidden_bytes(LLM, 20)) + hop) and first.link_s == 0
    assert first.cache.length("c") == 20 and first.cache.length("d") == 1  # noise blocks are not cached
    first.free(["c", "d"])
    assert first.cache.context_ids() == []


def test_simulated_vit_and_vae_shapes(h200):
    sim = Simulation(h200, time_scale=0.0)
    vit = SimulatedVisionEncoder(FULL, sim)
    assert [tuple(e.shape) for e in vit.embed_images([torch.zeros(3, 980, 980), torch.zeros(3, 224, 448)])] == \
        [(4900, 1), (512, 1)]
    vae = SimulatedAutoEncoder(FULL, sim)
    assert vae.encode(torch.zeros(1, 3, 512, 768), noise=None).shape == (1, 16, 64, 96)
    pixels = vae.decode(torch.zeros(1, 16, 64, 96))
    assert pixels.shape == (1, 3, 512, 768) and -1 <= float(pixels.min()) < float(pixels.max()) <= 1
    assert fit_latent_rgb(vae).shape == (FULL.vae.z_channels + 1, 3)  # the decoder's preview map


# -- the analytic model ---------------------------------------------------------------------------

def test_trace_and_topologies(h200):
    tok = demo_tokenizer()
    traces = {task: trace(FULL, tok, task, 256, steps=6) for task in ("t2i", "edit")}
    kinds = [c.kind for c in traces["edit"] if c.kind != "free"]  # (frees of empty contexts come first)
    assert kinds[:4] == ["encode_vae", "prefill", "encode_vit", "prefill"] and kinds.count("denoise") == 5
    assert {s.branch for c in traces["edit"] if c.kind == "denoise" for s in c.segments} == {"cond", "cfg_text", "cfg_img"}

    def run(topology: str, task: str, concurrency: int, policy: str = "fifo") -> dict:
        return summarize(Model(FULL, h200, Topology.parse(topology), policy).run(traces, [task] * 4 * concurrency,
                                                                              concurrency), concurrency)

    one = run("1x1x1", "t2i", 1)
    assert one["stage_busy_fraction"]["r0g0s0"] > 0.9 and one["stage_blocked_fraction"]["r0g0s0"] == 0
    assert run("2x1x1", "t2i", 2)["throughput_per_min"] == pytest.approx(2 * one["throughput_per_min"], rel=0.02)
    assert run("1x2x1", "t2i", 1)["latency_s"]["p50"] < 0.8 * one["latency_s"]["p50"]
    assert run("1x3x1", "edit", 1)["latency_s"]["p50"] < 0.6 * run("1x1x1", "edit", 1)["latency_s"]["p50"]
    fifo, ready = run("1x1x3", "t2i", 4), run("1x1x3", "t2i", 4, "ready")
    assert ready["throughput_per_min"] >= fifo["throughput_per_min"]
    assert max(fifo["stage_blocked_fraction"].values()) > 0  # head-of-line waits show up
    with pytest.raises(ValueError, match="replicas x cfg_parallel x stages"):
        Topology.parse("2x3")


def test_simulate_harness_writes_report_table_and_chart(tmp_path):
    code = simulate.main(["--modes", "analytic", "--size", "256", "--steps", "4", "--concurrency", "1,2",
                          "--topologies", "1x1x1,1x2x1,2x1x1", "--model-requests-per-client", "2",
                          "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "simulate_h200.json").read_text())
    assert set(report["topologies"]) == {"1x1x1", "1x2x1", "2x1x1"}
    assert report["validation"]["measured_s"] > 0 and "analytic_error" in report["validation"]
    assert {row["topology"] for row in report["targets"] if "analytic" in row} == {"1x2x1", "2x1x1"}
    assert "| 1x2x1 | 2 | t2i |" in (tmp_path / "simulate_h200.md").read_text()
    assert (tmp_path / "simulate_h200.png").stat().st_size > 10_000
    rtx = simulate.stage_memory(FULL, load_profile("rtx4090"), Topology.parse("1x1x1"))
    assert not rtx["fits"] and simulate.stage_memory(FULL, load_profile("rtx4090"), Topology.parse("1x1x3"))["fits"]


def test_harness_skips_what_the_app_cannot_run():
    from cluster.args import AppArgs

    args, why = simulate.app_args(Topology.parse("1x1x3"), "h200", 1.0)
    assert args == {"simulate": "h200", "simulate_time_scale": 1.0, "num_stages": 3} and not why
    args, why = simulate.app_args(Topology.parse("2x1x1"), "h200", 1.0)
    assert (args is None) == ("num_replicas" not in AppArgs.model_fields)
    with pytest.raises(ValueError, match="unknown hardware profile"):
        AppArgs(simulate="tpu")


# -- the simulated Serve app ------------------------------------------------------------------------

def test_simulated_serve_app(ray_url):
    """The real app with simulated GPUs (2 stages, full-size shapes, time scale 0.01): images of the
    asked size, streamed previews, a chat answer, /health says simulated and shows the KV
    bookkeeping; nothing leaks. With `prefix_cache: false` nothing is cached or reused."""
    args = {"simulate": "h200", "simulate_time_scale": 0.01, "num_stages": 2, "prefix_cache": False}
    with running_app(ray_url, args):
        client = httpx.Client(base_url=ray_url, timeout=120)
        health = client.get("/health").json()
        assert health["simulated"] == "h200" and [s["layers"] for s in health["stages"]] == [[0, 14], [14, 28]]
        r = client.post("/v1/images/generations", json={"prompt": "a red fox", "size": "512x256", "num_timesteps": 4})
        assert r.status_code == 200, r.text
        assert (r.json()["data"][0]["width"], r.json()["data"][0]["height"]) == (512, 256)
        image = png_bytes(Image.new("RGB", (640, 512), (40, 90, 200)))
        r = client.post("/v1/images/edits", json={"prompt": "make it red", "image": data_url(image), "num_timesteps": 3})
        assert r.status_code == 200 and (r.json()["data"][0]["width"], r.json()["data"][0]["height"]) == (640, 512)
        body = {"prompt": "a fox", "size": "256x256", "num_timesteps": 4, "stream": True, "partial_images": 1}
        with client.stream("POST", "/v1/images/generations", json=body) as response:
            assert response.status_code == 200
            events = [e["type"] for e in sse_events(response.iter_lines()) if isinstance(e, dict)]
        assert "image_generation.partial_image" in events and events[-1] == "image_generation.completed"
        for _ in range(2):
            r = client.post("/v1/chat/completions", json={"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        health = client.get("/health").json()
        assert health["prefix_cache"] is None
        assert all(s["busy_s"] > 0 and s["live_contexts"] == 0 and s["kv_bytes"] == 0 and s["prefix_cache_contexts"] == 0
                   for s in health["stages"])
