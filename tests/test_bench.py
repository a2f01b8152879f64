"""The latency benchmark runs end to end (on CPU, on the fixture model) and reports sane numbers."""
from __future__ import annotations

import json

from bench import latency


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
