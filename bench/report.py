"""Summary table (Markdown) and chart (PNG) of the committed GPU results in bench/results/.
Numbers come only from those JSON files.

    python -m bench.report            # writes bench/results/summary.md and summary.png
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# Reference points from ../shared/research (official code on the lent H100) and the targets.
OFFICIAL_H100 = {"t2i": 15.5, "edit": 29.6, "decode_tokens_per_s": 7.7}
TARGETS = {"t2i": 8.0, "edit": 16.0, "decode_tokens_per_s": 150.0}


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _median_after_first(values: list[float]) -> float:
    rest = sorted(values[1:])  # the first request warms up
    return rest[len(rest) // 2]


def rows() -> list[tuple[str, str, str, str, str]]:
    out = []
    for label, name in (("in-process, eager (first version)", "latency_baseline_h100.json"),
                        ("in-process, exact (fused kernels, CUDA-graph decode)", "latency_compiled_h100.json"),
                        ("in-process, APPROXIMATE FP8 generation MLP", "latency_fp8_h100.json"),
                        ("in-process, APPROXIMATE cfg_refresh_interval 2", "latency_cfg_refresh2_h100.json"),
                        ("in-process, APPROXIMATE cfg_refresh_interval 3", "latency_cfg_refresh3_h100.json")):
        r = load(name)["results"]
        for task, title in (("t2i", "text-to-image 1024², 50 steps"), ("edit", "edit 1024²")):
            dev = r[task].get("deviation_from_exact")
            note = f" (vs exact: latent rel. L2 {dev['latent_relative_l2']:.3f}, PSNR {dev['image_psnr_db']:.1f} dB)" if dev else ""
            out.append((f"{label}: {title}{note}", f"{r[task]['end_to_end_s']['median']:.2f} s",
                        f"{r[task]['denoise_tflops']:.0f} TFLOP/s", f"{OFFICIAL_H100[task]} s", f"<= {TARGETS[task]} s"))
        if "understand" in r:
            d = r["understand"]["decode_tokens_per_s"]
            out.append((f"{label}: decode batch 1 / 8", f"{d['1']['tokens_per_s']:.0f} / {d['8']['tokens_per_s']:.0f} tok/s",
                        "", f"{OFFICIAL_H100['decode_tokens_per_s']} tok/s", f">= {TARGETS['decode_tokens_per_s']:.0f} tok/s"))
    exact = load("latency_compiled_h100.json")["results"]["t2i"]["end_to_end_s"]["median"]
    serve = load("serve_gpu_1stages_1024.json")
    request, busy = _median_after_first(serve["request_s"]), _median_after_first(serve["stage_busy_s"])
    out.append(("Serve app, 1 stage on the GPU: text-to-image 1024² over HTTP "
                f"(stage busy {busy:.2f} s; {100 * (request / exact - 1):.1f}% over in-process exact)",
                f"{request:.2f} s", "", "", "within 5%"))
    out.append(("Serve app, 3 stages (24 GiB cap each) + encoder + decoder sharing the GPU: "
                "text-to-image 1024² over HTTP", f"{load('serve_gpu_3stages_1024.json')['request_s'][-1]:.2f} s", "", "", ""))
    return out


def h200_rows() -> list[tuple[str, str, str, str]]:
    """This session's H200 runs: exact paths with and without CUDA graphs, the Serve app, and
    the kernel floor of the profiled forward scaled to a whole text-to-image."""
    out = []
    for label, name in (("in-process, exact, CUDA graphs", "latency_compiled_h200.json"),
                        ("in-process, exact, no graphs", "latency_nographs_h200.json"),
                        ("in-process, exact, CUDA graphs", "latency_512_h200.json"),
                        ("in-process, exact, no graphs", "latency_512__no_graphs_h200.json")):
        doc = load(name)
        size = doc["settings"]["size"]
        for task, r in doc["results"].items():
            if task == "understand":
                d = r["decode_tokens_per_s"]
                out.append((f"{label}: decode batch 1 / 8", f"{d['1']['tokens_per_s']:.0f} / {d['8']['tokens_per_s']:.0f} tok/s",
                            "", f">= {TARGETS['decode_tokens_per_s']:.0f} tok/s"))
                continue
            title = {"t2i": f"text-to-image {size}², 50 steps", "edit": f"edit {size}²"}[task]
            out.append((f"{label}: {title}", f"{r['end_to_end_s']['median']:.2f} s", f"{r['denoise_tflops']:.0f} TFLOP/s",
                        f"<= {TARGETS[task]} s" if size == 1024 else ""))
    exact = load("latency_compiled_h200.json")["results"]["t2i"]
    serve = load("serve_gpu_1stages_1024_h200.json")
    request, busy = _median_after_first(serve["request_s"]), _median_after_first(serve["stage_busy_s"])
    out.append(("Serve app, 1 stage on the GPU: text-to-image 1024² over HTTP "
                f"(stage busy {busy:.2f} s; {100 * (request / exact['end_to_end_s']['median'] - 1):.1f}% over in-process exact)",
                f"{request:.2f} s", "", "within 5%"))
    for label, name in (("CUDA graphs", "profile_denoise_h200.json"), ("no graphs", "profile_denoise_nographs_h200.json")):
        p = load(name)
        out.append((f"one two-branch 1024² forward, {label} (GPU idle {p['gpu_idle_ms']:.1f} ms, host enqueue "
                    f"{p['host_enqueue_ms']:.1f} ms)", f"{p['forward_ms']:.1f} ms", f"{p['tflops']:.0f} TFLOP/s", ""))
    floor = load("profile_denoise_h200.json")["kernel_floor"]["total_ms"]
    forwards = exact["forwards"] / 2  # two-branch forwards (a one-branch forward counted as half)
    out.append((f"kernel floor: the forward's GEMMs and attention timed alone ({floor:.1f} ms) x {forwards:g} "
                f"two-branch forwards + VAE decode", f"{floor * forwards / 1000 + exact['vae_decode_s']['median']:.2f} s",
                "", f"<= {TARGETS['t2i']} s"))
    return out


def main() -> None:
    table = ["| measurement (H100, random bf16 weights) | ours | achieved | official | target |",
             "|---|---|---|---|---|"]
    table += [f"| {' | '.join(r)} |" for r in rows()]
    table += ["", "| measurement (H200, random bf16 weights) | ours | achieved | target (set for the H100) |",
              "|---|---|---|---|"]
    table += [f"| {' | '.join(r)} |" for r in h200_rows()]
    (RESULTS / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load(n)["results"] for n in ("latency_baseline_h100.json", "latency_compiled_h100.json", "latency_fp8_h100.json",
                                         "latency_cfg_refresh2_h100.json", "latency_cfg_refresh3_h100.json")]
    serve1 = load("serve_gpu_1stages_1024.json")
    labels = ["official", "ours, first", "ours, exact", "FP8\n(approx.)", "refresh 2\n(approx.)",
              "refresh 3\n(approx.)", "Serve 1 stage\n(exact)", "target"]
    t2i = [OFFICIAL_H100["t2i"], *(r["t2i"]["end_to_end_s"]["median"] for r in runs),
           _median_after_first(serve1["request_s"]), TARGETS["t2i"]]
    edit = [OFFICIAL_H100["edit"], *(r["edit"]["end_to_end_s"]["median"] for r in runs), float("nan"), TARGETS["edit"]]
    fig, axes = plt.subplots(1, 3, figsize=(19, 4.6), gridspec_kw={"width_ratios": [8, 8, 5]})
    for ax, values, title in ((axes[0], t2i, "text-to-image 1024², 50 steps"), (axes[1], edit, "edit 1024², 50 steps")):
        ax.bar(labels, values, color=["#999", "#9c8", "#2a5", "#e93", "#eb6", "#fc8", "#48c", "#c44"])
        ax.set(title=title, ylabel="seconds (H100)")
        ax.tick_params(axis="x", rotation=30)
    t2i_h200 = {f"{size}², {kind}": load(name)["results"]["t2i"]["end_to_end_s"]["median"]
                for size, kind, name in ((1024, "no graphs", "latency_nographs_h200.json"),
                                         (1024, "graphs", "latency_compiled_h200.json"),
                                         (512, "no graphs", "latency_512__no_graphs_h200.json"),
                                         (512, "graphs", "latency_512_h200.json"))}
    axes[2].bar(list(t2i_h200), list(t2i_h200.values()), color=["#9c8", "#2a5", "#9c8", "#2a5"])
    axes[2].set(title="H200: text-to-image, 50 steps, exact", ylabel="seconds (H200)")
    axes[2].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(RESULTS / "summary.png", dpi=100)


if __name__ == "__main__":
    main()
