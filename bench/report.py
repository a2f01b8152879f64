"""Summary table (Markdown) and chart (PNG) of the committed GPU results in bench/results/.
Numbers come only from those JSON files.

    python -m bench.report            # writes bench/results/summary.md and summary.png
    python -m bench.report --quant bench/results/quant_h200.json   # the weight-format tables (.md beside it)

bench/side_by_side.py writes its own table (`side_by_side_table`) beside its JSON.
"""
from __future__ import annotations

import json
import math
import sys
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


GIB = 1 << 30


def _gib(b: float | None) -> str:
    return "" if b is None else f"{b / GIB:.1f}"


def _pair(run: dict, key, fmt) -> str:
    """`key(run[task])` for t2i and edit as "a / b" (blank where the run has no such result)."""
    values = [key(run[t]) if t in run else None for t in ("t2i", "edit")]
    return " / ".join("" if v is None else fmt(v) for v in values)


def quant_tables(doc: dict) -> str:
    """Markdown tables of a bench/quant.py report: formats on one capped GPU, per-layer weight
    errors, FP8 for the generation MLP only against every linear layer, and the planner's layouts
    for 24 GB cards."""
    s = doc["settings"]
    exact = doc["runs"]["bf16"]
    lines = [f"Weight formats on {doc['device']} (torch {doc['torch']}, torchao {doc['torchao']}), {doc['weights']}, "
             f"{s['size']}x{s['size']}, {s['steps']} steps, one run each; cap = the card emulated (the allocator gets "
             f"it minus this process's CUDA context, {_gib(doc['cuda_context_bytes'])} GiB):", "",
             "| weights | cap GiB | LLM weights GiB | peak GiB (planned) | text-to-image / edit s | decode tok/s b1 / b8 "
             "| latent rel. L2 t2i / edit | PSNR dB t2i / edit | answer tokens equal | bit-identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in doc["runs"].items():
        if run["quantize"] == "fp8-gen-mlp":
            continue
        label = name if run["quantize"] else "bf16 (exact)"
        if run.get("size", s["size"]) != s["size"]:
            label += f", {run['size']}x{run['size']}"
        if run.get("cap_bytes") and run.get("graphs") is False:
            label += ", no CUDA graphs"
        planned = run.get("planner", {})
        plan = "" if not planned else (f" ({_gib(planned['allocated_peak_bytes'])}"
                                       f"{'' if planned['fits'] else ', does not fit'})")
        if "error" in run:
            lines.append(f"| {label} | {_gib(run['cap_bytes'])} | {_gib(run.get('llm_weight_bytes'))} | "
                         f"{run['error'].split(':')[0]}{plan} | | | | | | |")
            continue
        decode = run.get("decode_tokens_per_s", {})
        dev = lambda k: (lambda r: r.get("deviation_from_exact", {}).get(k))  # noqa: E731
        answer = run.get("answer")
        lines.append(" | ".join([
            f"| {label}", _gib(run["cap_bytes"]) or "none", _gib(run["llm_weight_bytes"]),
            _gib(run.get("peak_memory_bytes")) + plan,
            _pair(run, lambda r: r["end_to_end_s"]["median"], "{:.2f}".format),
            f"{decode['1']:.0f} / {decode['8']:.0f}" if decode else "",
            _pair(run, dev("latent_relative_l2"), "{:.4f}".format),
            _pair(run, dev("image_psnr_db"), lambda v: "inf" if math.isinf(v) else f"{v:.1f}"),
            f"{100 * answer['agreement']:.0f}% (first difference at {answer['first_difference']})" if answer else "",
            _pair(run, lambda r: r.get("bit_identical"), lambda v: "yes" if v else "no") + " |"]))
    lines += ["", "Per-layer weight reconstruction error (first and last decoder layer, every linear weight as "
              "stored; independent of what the weights are):", "",
              "| weights | bits per weight | relative L2 mean (max) | bit-identical decode (GPU kernel, torch ops) |",
              "|---|---|---|---|"]
    for fmt, entries in doc["layer_errors"].items():
        e = list(entries.values())
        rel = [x["relative_l2"] for x in e]
        bits = sum(x["bits_per_weight"] for x in e) / len(e)
        identical = ("" if "bit_identical" not in e[0] else
                     f"{'yes' if all(x['bit_identical'] for x in e) else 'NO'} ({e[0]['decoder']}), "
                     f"{'yes' if all(x['torch_decoder_bit_identical'] for x in e) else 'NO'}")
        lines.append(f"| {fmt} | {bits:.2f} | {sum(rel) / len(rel):.4f} ({max(rel):.4f}) | {identical} |")
    gen_mlp = {n: r for n, r in doc["runs"].items() if r["quantize"] == "fp8-gen-mlp" and "t2i" in r}
    if gen_mlp:
        every = {f"{n} (every linear layer{', capped' if r['cap_bytes'] else ''})": r for n, r in doc["runs"].items()
                 if r["quantize"] == "fp8" and "t2i" in r and r.get("size", s["size"]) == s["size"]}
        lines += ["", "FP8 GEMMs for the generation expert's MLP only (`fp8: true`; same weights, uncapped):", "",
                  "| weights | text-to-image s | latent rel. L2 vs exact | PSNR dB |", "|---|---|---|---|"]
        lines += [f"| {n} | {r['t2i']['end_to_end_s']['median']:.2f} | "
                  f"{r['t2i']['deviation_from_exact']['latent_relative_l2']:.4f} | "
                  f"{r['t2i']['deviation_from_exact']['image_psnr_db']:.1f} |" for n, r in {**gen_mlp, **every}.items()]
        lines.append(f"| exact bf16 | {exact['t2i']['end_to_end_s']['median']:.2f} | 0 | inf |")
    lines += ["", "The memory planner's layouts for 24 GB cards (the service: stage, encoder and decoder processes; "
              "one edit at the model's largest size must fit, the rest of the memory is KV budget):", "",
              "| GPUs | stages | layers per stage | weights | KV budget per stage GiB | such edits at once |",
              "|---|---|---|---|---|---|"]
    for gpus, layout in doc["layouts"].items():
        if "error" in layout:
            lines.append(f"| {gpus} | does not fit: {layout['error'].split(':')[0]} | | | | |")
        else:
            lines.append(f"| {gpus} | {layout['num_stages']} | {layout['layer_sizes']} | "
                         f"{layout['quantize'] or 'bf16 (exact)'} | {_gib(layout['kv_cache_bytes'])} | "
                         f"{layout['requests']} at {layout['image_size']}x{layout['image_size']} |")
    if doc.get("skipped"):
        lines += ["", f"Not measured (time budget): {', '.join(doc['skipped'])}."]
    return "\n".join(lines) + "\n"


def _choice(kernels: dict) -> str:
    """A KernelChoice as recorded, in words: "attention sdpa, mlp cublas, norm torch, compiled"."""
    return ", ".join([f"{k} {v}" for k, v in kernels.items() if k != "compile"] +
                     ["compiled" if kernels["compile"] else "not compiled"])


def side_by_side_table(doc: dict) -> str:
    """Markdown tables of a bench/side_by_side.py report: each official run against ours, and the
    optional kernels against the default ones."""
    off = doc["official"]
    same = "the official settings" if doc["same_settings_as_official"] else f"overrides {doc['overrides']}"
    prompts = ", ".join(f"{t} {p['tokens']}" for t, p in doc["prompts"].items())
    lines = [f"Ours on {doc['device']} (torch {doc['torch']}, commit {doc['commit']}, {doc['weights']}) against the "
             f"official code ({off['official_commit'][:7]}) on {off['device']} (torch {off['torch']}); {same}, seed "
             f"{doc['seed']}, prompt tokens {prompts} ({next(iter(doc['prompts'].values()))['how']}), the official "
             "warm-ups first, one run each:", "",
             "| run | official s | ours s | speedup | ours: denoise / VAE decode s (decode tok/s) | official: the same |",
             "|---|---|---|---|---|---|"]

    def phases(r: dict) -> str:
        if "decode_tokens_per_s" in r:
            return f"{r['decode_tokens_per_s']:.1f} tok/s"
        return f"{r['denoise_loop_s']:.2f} / {r['vae_decode_s']:.2f}"

    for name, r in doc["runs"].items():
        if "official" in r:
            lines.append(f"| {name} | {r['official']['total_s']:.2f} | {r['total_s']:.2f} | {r['speedup']:.2f}x | "
                         f"{phases(r)} | {phases(r['official'])} |")
    if doc["kernels"]:
        default = {t: doc["runs"][n]["total_s"] for t, n in (("t2i", "t2i_notebook_1"), ("edit", "edit_notebook"))
                   if n in doc["runs"]}
        lines += ["", f"Kernels on the same model and noise (t2i / edit; within bound: max |diff| and relative L2 to "
                      f"the default at most {doc.get('tolerance', '')}x the plain path's):", "",
                  "| kernels (in effect) | t2i / edit s | max abs diff vs default | relative L2 vs default | within bound |",
                  "|---|---|---|---|---|",
                  f"| default ({_choice(doc['kernels_in_effect'])}) | {_pair(default, lambda v: v, '{:.2f}'.format)} | "
                  "0 | 0 | |"]
        for name, k in doc["kernels"].items():
            dev = lambda key: (lambda r: r["vs_default"][key])  # noqa: E731
            if "error" in k:
                lines.append(f"| {name}: {k['error']} | | | | |")
                continue
            lines.append(f"| {name} ({_choice(k['in_effect'][0])}) | {_pair(k, lambda r: r['total_s'], '{:.2f}'.format)} | "
                         f"{_pair(k, dev('max_abs_diff'), '{:.3g}'.format)} | "
                         f"{_pair(k, dev('relative_l2'), '{:.3g}'.format)} | "
                         f"{'' if 'within_bound' not in k else 'yes' if k['within_bound'] else 'NO'} |")
    if doc["skipped"]:
        lines += ["", f"Not measured (time budget): {', '.join(doc['skipped'])}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--quant"]:
        path = Path(sys.argv[2])
        text = quant_tables(json.loads(path.read_text()))
        path.with_suffix(".md").write_text(text)
        print(text)
        return
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
