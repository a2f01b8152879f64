"""The latency and kernel benchmarks run end to end (on CPU, on the fixture model) and report sane numbers."""
from __future__ import annotations

import json

from bagel_model.config import BagelConfig
from bench import batching, kernels, latency, prefix_cache, previews
from bench.report import quant_tables as report_tables


def test_latency_benchmark_reports(checkpoint_dir, tmp_path):
    code = latency.main(["--device", "cpu", "--checkpoint", str(checkpoint_dir), "--size", "64", "--steps", "4",
                         "--repeats", "1", "--warmup", "0", "--decode-tokens", "3", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "latency.json").read_text())
    t2i, edit, und = (report["results"][k] for k in ("t2i", "edit", "understand"))
    # 4 timesteps = 3 forwards at t = 1, 0.857, 0.6: all inside the default interval (0.4, 1].
    assert t2i["denoise_calls"] == [2, 2, 2] and t2i["forwards"] == 6
    assert edit["denoise_calls"] == [3, 3, 3]
    for r in (t2i, edit):
        assert 0 < r["denoise_s"]["median"] < r["end_to_end_s"]["median"]
        assert r["flop_model_pflop"] > 0 and r["denoise_tflops"] > 0
    assert und["prefill_s"]["median"] > 0
    assert und["decode_tokens_per_s"]["8"]["tokens_per_s"] > 0


def test_fp8_benchmark_measures_its_deviation(checkpoint_dir, tmp_path):
    """--fp8 first runs the exact model, then the approximate one with the same noise, and
    reports how far apart they are (neither equal nor far, on the fixture)."""
    code = latency.main(["--device", "cpu", "--checkpoint", str(checkpoint_dir), "--size", "64", "--steps", "4",
                         "--repeats", "1", "--warmup", "0", "--tasks", "t2i", "--fp8", "--out", str(tmp_path)])
    assert code == 0
    deviation = json.loads((tmp_path / "latency.json").read_text())["results"]["t2i"]["deviation_from_exact"]
    assert 1e-3 < deviation["latent_relative_l2"] < 0.2
    assert 15 < deviation["image_psnr_db"] < 80


def test_kernel_flags_fall_back_and_are_checked_against_the_exact_run(checkpoint_dir, tmp_path):
    """--attention fa4 --mlp quack --norm quack on a machine without those kernels: the report
    says the default kernels ran, and the run with the flags equals the exact run bit for bit."""
    code = latency.main(["--device", "cpu", "--checkpoint", str(checkpoint_dir), "--size", "64", "--steps", "3",
                         "--repeats", "1", "--warmup", "0", "--tasks", "t2i", "--attention", "fa4", "--mlp", "quack",
                         "--norm", "quack", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "latency.json").read_text())
    assert report["kernels_in_effect"] == [{"attention": "sdpa", "mlp": "cublas", "compile": False, "norm": "torch"}]
    assert report["results"]["t2i"]["deviation_from_exact"]["latent_relative_l2"] == 0


def test_kernels_benchmark_smoke(checkpoint_dir, tmp_path):
    """The kernel benchmark on CPU with the fixture's shapes: the current path of every operation
    is timed and exact; the GPU-only candidates are recorded as unavailable, not as errors."""
    code = kernels.main(["--device", "cpu", "--checkpoint", str(checkpoint_dir), "--size", "64", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "kernels.json").read_text())
    config = BagelConfig.from_checkpoint_dir(checkpoint_dir)
    tokens = (64 // config.latent_downsample) ** 2 + 2
    assert report["shapes"]["t2i"]["query_tokens"] == tokens
    assert report["shapes"]["generation_rows"] == 2 * tokens
    rows = report["results"]
    ops = {r["op"] for r in rows}
    assert {"attention t2i cond", "gate_up + SwiGLU", "down + residual", "rms_norm", "q/k norm + RoPE",
            "causal text after image"} <= ops
    for r in rows:
        if r["variant"] == "current":
            assert r["exact"] and r["ms"] > 0 and 0 < r["vs_fp32"]["relative_l2"] < 0.02
        elif r["variant"] in ("fa4", "quack", "quack_autotuned"):
            assert r["unavailable"] == "needs a CUDA GPU, not cpu"
    summary = report["summary"]
    assert {op["best"] for op in summary["ops"].values()} <= {None, "compiled_joint"}  # the one CPU candidate
    assert summary["t2i_saving_ms_per_two_branch_forward"] == sum(
        op["saving_ms_per_forward"] for name, op in summary["ops"].items() if not name.startswith("attention edit"))


def test_quant_benchmark_runs_on_cpu(checkpoint_dir, tmp_path):
    """bench/quant.py end to end on the fixture: df11 reproduces the exact run bit for bit,
    int8 comes close without being equal, and every section of the report is filled."""
    from bench import quant

    code = quant.main(["--device", "cpu", "--checkpoint", str(checkpoint_dir), "--formats", "df11,int8", "--size", "64",
                       "--steps", "3", "--answer-tokens", "4", "--decode-tokens", "2", "--nf4-cap-gib", "0",
                       "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "quant.json").read_text())
    runs = report["runs"]
    assert set(runs) == {"bf16", "df11", "int8"} and report["skipped"] == []
    for task in ("t2i", "edit"):
        assert runs["df11"][task]["bit_identical"] is True
        assert runs["int8"][task]["bit_identical"] is False
        assert 0 < runs["int8"][task]["deviation_from_exact"]["latent_relative_l2"] < 0.05
        assert runs["bf16"][task]["end_to_end_s"]["median"] > 0
    # the int8 edit differs from the exact one, but not because of its input encodings
    assert runs["int8"]["edit"]["input_encodings_equal_exact"] == {"vit": True, "vae": True}
    assert runs["df11"]["answer"]["agreement"] == 1.0
    assert runs["df11"]["llm_weight_bytes"] < runs["bf16"]["llm_weight_bytes"]
    assert runs["int8"]["decode_tokens_per_s"]["8"] > 0
    df11_layers, int8_layers = report["layer_errors"]["df11"], report["layer_errors"]["int8"]
    assert all(e["bit_identical"] and e["relative_l2"] == 0 for e in df11_layers.values())
    assert all(0 < e["relative_l2"] < 0.01 for e in int8_layers.values())
    assert set(report["layouts"]) == {"1x24GiB", "2x24GiB", "3x24GiB"}
    tables = report_tables(report)  # the README's tables are rendered from this JSON
    assert "| df11 | none |" in tables and "| yes / yes |" in tables and "| int8 | 8.55 |" in tables


def test_quant_benchmark_can_replay_the_exact_runs_encodings(executor):
    """The df11 check on a capped GPU: the edit again with the exact run's input-image encodings
    gives the same result as the run that made them, and other encodings another one."""
    from argparse import Namespace

    import torch

    from bench.quant import _GivenEncodings, _KeepsDecoded
    from pipelines.noise import NoiseSource
    from pipelines.tasks import generate_image

    items, params = latency.edit_job(Namespace(size=64, steps=3, cfg_refresh_interval=1))
    recording = _KeepsDecoded(executor)
    first = generate_image(recording, items, params, noise=NoiseSource(0))
    assert set(recording.encodings) == {"vit", "vae"}
    replayed = generate_image(_GivenEncodings(executor, recording.encodings), items, params, noise=NoiseSource(0))
    assert torch.equal(replayed.latent, first.latent)
    other = {**recording.encodings, "vae": recording.encodings["vae"] * 1.01}
    assert not torch.equal(generate_image(_GivenEncodings(executor, other), items, params,
                                          noise=NoiseSource(0)).latent, first.latent)


def test_quant_benchmark_compares_fp8_for_the_generation_mlp_with_every_layer(checkpoint_dir, tmp_path):
    """The lead's H200 command on the fixture: fp8 text-to-image only, three ways. fp8 for the
    generation MLP alone deviates less than fp8 for every linear layer, and neither is exact."""
    from bench import quant

    assert quant.main(["--device", "cpu", "--checkpoint", str(checkpoint_dir), "--formats", "fp8", "--tasks", "t2i",
                       "--nf4-cap-gib", "0", "--size", "64", "--steps", "4", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quant.json").read_text())
    runs = report["runs"]
    assert set(runs) == {"bf16", "fp8", "fp8 gen-MLP"} and report["skipped"] == [] and "errors" not in report
    assert all("edit" not in r and "answer" not in r and "decode_tokens_per_s" not in r for r in runs.values())
    gen_mlp, every = (runs[n]["t2i"]["deviation_from_exact"]["latent_relative_l2"] for n in ("fp8 gen-MLP", "fp8"))
    assert 1e-3 < gen_mlp < every < 0.2
    assert runs["bf16"]["llm_weight_bytes"] > runs["fp8 gen-MLP"]["llm_weight_bytes"] > runs["fp8"]["llm_weight_bytes"]
    tables = report_tables(report)
    assert "| fp8 gen-MLP |" in tables and "| fp8 (every linear layer) |" in tables and "| exact bf16 |" in tables


def test_quant_benchmark_stops_at_its_time_budget(checkpoint_dir, tmp_path):
    from bench import quant

    assert quant.main(["--device", "cpu", "--checkpoint", str(checkpoint_dir), "--formats", "int8,fp8", "--size", "64",
                       "--steps", "2", "--answer-tokens", "2", "--decode-tokens", "1", "--budget-s", "0",
                       "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quant.json").read_text())
    assert set(report["runs"]) == {"bf16"}
    assert report["skipped"] == ["int8 layer errors", "fp8 layer errors", "int8", "fp8", "fp8 gen-MLP"]
def test_previews_benchmark_measures_both_decoders(checkpoint_dir, tmp_path):
    """No previews, then 3 through each decoder, rendered and encoded as the service does."""
    code = previews.main(["--device", "cpu", "--checkpoint", str(checkpoint_dir), "--size", "64", "--steps", "6",
                          "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "previews.json").read_text())
    results = report["results"]
    assert results["none"]["previews_per_image"] == 0 and results["none"]["extra_pct"] == 0
    for decoder, size in (("linear", [8, 8]), ("vae", [64, 64])):
        r = results[decoder]
        assert r["previews_per_image"] == 3 and r["preview_steps"] == [2, 3, 4] and r["preview_size"] == size
        assert 0 < r["decode_s_per_preview"] <= r["render_s_per_preview"]
        assert r["end_to_end_s"]["median"] > 0 and isinstance(report["within_target"][decoder], bool)
    assert report["linear_map_fit_s"] > 0 and len(report["linear_vs_vae_psnr_db"]) == 3


def test_batching_benchmark_runs_every_configuration(checkpoint_dir, tmp_path):
    """Images/min with batching on and off per size and concurrency, the big size at 1 only,
    forward times per token count, the chart."""
    code = batching.main(["--device", "cpu", "--checkpoint", str(checkpoint_dir), "--sizes", "64:4,32:4",
                          "--concurrency", "1,3", "--waves", "1", "--big", "96:4", "--forward-segments", "1,4",
                          "--forward-repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "batching.json").read_text())
    runs = {(r["size"], r["concurrency"], r["batching"]): r for r in report["throughput"]}
    assert set(runs) == {(s, c, b) for s in (64, 32) for c in (1, 3) for b in (True, False)} | {
        (96, 1, True), (96, 1, False)}
    for (size, c, on), r in runs.items():
        assert r["images"] == c and r["images_per_min"] > 0  # one wave; the big size: one image
        # 4 timesteps: 3 forwards per image, each carrying 1..c requests
        assert (sum(int(n) * k for n, k in r["requests_per_forward"].items()) == 3 * c) if on else \
            r["requests_per_forward"] is None
    assert [(f["size"], f["segments"], f["tokens"]) for f in report["forward_ms"]] == [
        (64, 1, 18), (64, 4, 72), (32, 1, 6), (32, 4, 24)]
    assert all(f["eager_ms"] > 0 and "graph_ms" not in f for f in report["forward_ms"])  # no CUDA graphs on CPU
    assert set(report["summary"]) == {"64", "32", "96"} and (tmp_path / "batching.png").stat().st_size > 0
    assert report["targets"] == {}  # measured on the GPU sizes only


def test_side_by_side_runs_the_official_runs_and_reads_their_times(checkpoint_dir, tmp_path, monkeypatch):
    """bench/side_by_side.py on the fixture (sizes, steps and answer length overridden): the
    official runs in their order, with the official prompts' token counts (the fixture has the
    official harness's tokenizer), each timed run's speedup computed from the official JSON, the
    same seed giving the same image twice, FA4 falling back here to the default kernels (equal to
    the default run, so within the bound), a kernel that fails recorded as such, and the Markdown
    table."""
    from bench import side_by_side

    real = side_by_side.use_kernels

    def use_kernels(stage, choice):
        if choice.norm == "quack":
            raise RuntimeError("no such kernel")
        return real(stage, choice)

    monkeypatch.setattr(side_by_side, "use_kernels", use_kernels)

    code = side_by_side.main(["--device", "cpu", "--checkpoint", str(checkpoint_dir), "--size", "64",
                              "--warmup-size", "64", "--steps", "3", "--answer-tokens", "3",
                              "--attention", "fa4", "--norm", "quack", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "side_by_side.json").read_text())
    official = json.loads(side_by_side.OFFICIAL.read_text())
    assert list(report["runs"]) == list(official["runs"])
    assert report["same_settings_as_official"] is False and report["seed"] == official["settings"]["seed"] == 42
    assert {t: p["tokens"] for t, p in report["prompts"].items()} == official["settings"]["prompt_tokens"]
    runs = report["runs"]
    for name, r in runs.items():
        assert r["total_s"] > 0
        if name.startswith("warmup_"):
            assert "speedup" not in r
            continue
        assert r["speedup"] == official["runs"][name]["total_s"] / r["total_s"]
        assert report["summary"][name]["official_s"] == official["runs"][name]["total_s"]
    assert runs["warmup_t2i"]["num_timesteps"] == official["settings"]["warmups"]["t2i"][1] == 5
    assert runs["t2i_notebook_1"]["image_size"] == [64, 64] and runs["t2i_notebook_1"]["num_timesteps"] == 3
    assert runs["t2i_notebook_2"]["latent_equal_to_first_run"] is True
    assert runs["edit_notebook"]["llm_forwards_denoise"] == 3 * 2  # 3 timesteps = 2 steps of 3 branches
    assert runs["und_notebook"]["decode_steps"] <= 2 and runs["und_notebook"]["decode_tokens_per_s"] > 0
    kernels = report["kernels"]
    assert kernels.pop("norm=quack") == {"error": "RuntimeError: no such kernel"}
    assert set(kernels) == {"plain (no torch.compile)", "attention=fa4"}
    for entry in kernels.values():
        assert entry["in_effect"] == [{"attention": "sdpa", "mlp": "cublas", "compile": False, "norm": "torch"}]
        assert entry["t2i"]["vs_default"]["max_abs_diff"] == entry["edit"]["vs_default"]["relative_l2"] == 0
        assert entry["within_bound"] is True
    table = (tmp_path / "side_by_side.md").read_text()
    assert f"| t2i_notebook_1 | {official['runs']['t2i_notebook_1']['total_s']:.2f} |" in table
    assert "| attention=fa4 (" in table and "| yes |" in table and "| norm=quack: RuntimeError: no such kernel |" in table


def test_side_by_side_fits_prompts_to_the_official_token_counts():
    """Random-weight builds have the demo tokenizer: each official prompt becomes exactly the
    official number of tokens, cut from (or repeated from) the official text."""
    from bagel_model.demo import demo_tokenizer
    from bench import side_by_side

    official = json.loads(side_by_side.OFFICIAL.read_text())
    tok = demo_tokenizer()
    fitted = side_by_side.prompts(official, tok, fit=True)
    assert {t: p["tokens"] for t, p in fitted.items()} == official["settings"]["prompt_tokens"] == \
        {"t2i": 172, "edit": 36, "und": 24}
    assert official["settings"]["t2i_prompt"].startswith(fitted["t2i"]["text"])  # 388 bytes cut to 170
    assert side_by_side.fit_prompt(tok, "abc", 9) == "abcabca"  # 7 tokens + <|im_start|>, <|im_end|>
def test_serve_benchmark_reports_warm_start_overhead_and_breakdown(checkpoint_dir, tmp_path):
    """bench.serve_overhead end to end on the CPU (its own Ray, in a subprocess): the app is ready
    after warm-up, /health answered before that, and the report splits each request's time."""
    import subprocess
    import sys

    from .service_app import REPO_ROOT, free_port

    proc = subprocess.run([sys.executable, "-m", "bench.serve_overhead", "--device", "cpu", "--checkpoint",
                           str(checkpoint_dir), "--size", "64", "--steps", "3", "--requests", "3", "--in-process",
                           "--port", str(free_port()), "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "serve_overhead_1stages_64.json").read_text())
    assert report["health_first_answer_s"] < report["ready_s"], "/health answers (starting) before ready"
    assert set(report["warmup_s"]) == {"t2i 64x64", "edit 64x64", "understand 64x64"}
    assert len(report["request_s"]) == 3 and len(report["in_process_s"]) == 3
    assert report["first_over_steady"] > 0 and report["overhead_fraction"] > -1
    breakdown = report["breakdown_s"]
    assert {"queue", "prefill", "denoise", "vae_decode", "encode_output", "respond", "other", "http"} <= set(breakdown)
    assert breakdown["denoise"] > 0 and breakdown["http"] >= 0
    assert abs(sum(report["phases_s"][1].values()) - report["request_s"][1]) < 1e-6
    assert report["image_size"] == [64, 64] and report["live_contexts_after"] == 0


def test_prefix_cache_benchmark_reuses_and_stays_identical(checkpoint_dir, tmp_path):
    """bench/prefix_cache.py on the fixture: the second chat turn and the second edit reuse the
    first's prefix with the cache, nothing without it, and the outputs are identical."""
    code = prefix_cache.main(["--device", "cpu", "--checkpoint", str(checkpoint_dir), "--size", "64", "--steps", "3",
                              "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "prefix_cache.json").read_text())
    assert report["identical"] == report["uncached_repeatable"] == {"chat": True, "edit": True}
    for what in ("chat_second_turn", "second_edit"):
        r = report[what]
        assert r["uncached"]["cached_tokens"] == 0 < r["cached"]["cached_tokens"] < r["cached"]["prompt_tokens"]
        assert r["cached"]["prompt_tokens"] == r["uncached"]["prompt_tokens"]
    assert report["chat_second_turn"]["ttft_speedup"] > 0 and report["cache"]["hits"] >= 2
