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


def rows() -> list[tuple[str, str, str, str, str]]:
    out = []
    for label, name in (("in-process, eager", "latency_baseline_h100.json"),
                        ("in-process, compiled elementwise", "latency_compiled_h100.json")):
        r = load(name)["results"]
        out.append((f"{label}: text-to-image 1024², 50 steps", f"{r['t2i']['end_to_end_s']['median']:.2f} s",
                    f"{r['t2i']['denoise_tflops']:.0f} TFLOP/s", f"{OFFICIAL_H100['t2i']} s", f"<= {TARGETS['t2i']} s"))
        out.append((f"{label}: edit 1024²", f"{r['edit']['end_to_end_s']['median']:.2f} s",
                    f"{r['edit']['denoise_tflops']:.0f} TFLOP/s", f"{OFFICIAL_H100['edit']} s", f"<= {TARGETS['edit']} s"))
        d = r["understand"]["decode_tokens_per_s"]
        out.append((f"{label}: decode batch 1 / 8", f"{d['1']['tokens_per_s']:.0f} / {d['8']['tokens_per_s']:.0f} tok/s",
                    "", f"{OFFICIAL_H100['decode_tokens_per_s']} tok/s", f">= {TARGETS['decode_tokens_per_s']:.0f} tok/s"))
    for label, name in (("Serve app, 1 stage on the GPU", "serve_gpu_1stage_1024.json"),
                        ("Serve app, 3 stages (24 GiB cap each) + encoder + decoder on the GPU", "serve_gpu_3stages_1024.json")):
        r = load(name)
        out.append((f"{label}: text-to-image 1024² over HTTP", f"{r['request_s'][-1]:.2f} s", "", "", ""))
    return out


def main() -> None:
    table = ["| measurement (H100, random bf16 weights) | ours | achieved | official | target |",
             "|---|---|---|---|---|"]
    table += [f"| {' | '.join(r)} |" for r in rows()]
    (RESULTS / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eager, compiled = load("latency_baseline_h100.json")["results"], load("latency_compiled_h100.json")["results"]
    serve1, serve3 = load("serve_gpu_1stage_1024.json"), load("serve_gpu_3stages_1024.json")
    labels = ["official", "ours eager", "ours compiled", "Serve 1 stage", "Serve 3 stages", "target"]
    t2i = [OFFICIAL_H100["t2i"], eager["t2i"]["end_to_end_s"]["median"], compiled["t2i"]["end_to_end_s"]["median"],
           serve1["request_s"][-1], serve3["request_s"][-1], TARGETS["t2i"]]
    edit = [OFFICIAL_H100["edit"], eager["edit"]["end_to_end_s"]["median"], compiled["edit"]["end_to_end_s"]["median"],
            float("nan"), float("nan"), TARGETS["edit"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, values, title in ((axes[0], t2i, "text-to-image 1024², 50 steps"), (axes[1], edit, "edit 1024², 50 steps")):
        ax.bar(labels, values, color=["#999", "#4a7", "#2a5", "#48c", "#26a", "#c44"])
        ax.set(title=title, ylabel="seconds (H100)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(RESULTS / "summary.png", dpi=100)


if __name__ == "__main__":
    main()
