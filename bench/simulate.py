"""Timing-faithful simulation of deployment topologies (replicas x CFG-parallel branch groups x
MoT stages) for 1024² text-to-image and editing, on a CPU-only machine.

Two modes, the same hardware profile (bagel_model/hardware.json, calibrated from bench/results):
- `serve`: the real Serve application with `simulate: <profile>` (every GPU component sleeps for
  what the profile says and returns placeholder tensors), driven over HTTP by the load tester's
  closed loop. Routing, admission, micro-batch order, the step protocol, the transport, Ray
  calls, PNG and HTTP are real; so is this machine's CPU time for them.
- `analytic`: the event-driven model of bench/event_sim.py (devices only, no host costs), for
  every topology, also those the app cannot run yet; plus a what-if with a stage-side scheduler
  that runs ready micro-batches first ("ready" policy).

    python -m bench.simulate --profile h200 --time-scale 0.25 --requests-per-client 1   # everything (~13 min)
    python -m bench.simulate --modes analytic --profile rtx4090            # seconds

Writes simulate_<profile>.json, .png (latency and throughput vs concurrency) and .md (the
README table). The h200 1x1x1 text-to-image is validated against our measured Serve latency.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import time
from pathlib import Path

from bagel_model.config import BagelConfig
from bagel_model.demo import demo_tokenizer
from bagel_model.hardware import RESULTS, Profile, load_profile
from bagel_model.memory_plan import GiB, stage_weight_bytes
from bagel_model.stage import split_layers
from bench.event_sim import Model, Topology, steady_throughput, summarize, trace
from bench.provenance import commit, write_report

TOPOLOGIES = "1x1x1,1x1x3,1x2x1,1x3x1,2x1x1,2x1x3,1x2x3"
VALIDATION = "serve_gpu_1stages_1024_h200.json"  # measured Serve latency the h200 1x1x1 must match
MEMORY_HEADROOM = 0.9  # stage weights may use this share of a GPU (activations, KV caches, CUDA context)
TARGETS = [  # the targets on the simulator: (what, task, topology, measure, bound)
    ("CFG-parallel 2, text-to-image: latency vs 1x1x1", "t2i", "1x2x1", "latency", 0.60),
    ("CFG-parallel 3, editing: latency vs 1x1x1", "edit", "1x3x1", "latency", 0.45),
    ("3-stage pipeline: throughput at saturation vs 1x1x1", "t2i", "1x1x3", "throughput", 2.7),
    ("2 replicas: throughput vs 1x1x1", "t2i", "2x1x1", "throughput", 1.9),
]


def stage_memory(config: BagelConfig, profile: Profile, topology: Topology) -> dict:
    """Weights per stage GPU against the profile's memory."""
    specs = split_layers(config.llm.num_hidden_layers, topology.stages)
    weights = [stage_weight_bytes(config, spec, None) for spec in specs]  # exact bf16
    return {"stage_weights_gib": [w / GiB for w in weights], "gpu_gib": profile.memory_bytes / GiB,
            "fits": max(weights) <= MEMORY_HEADROOM * profile.memory_bytes}


def app_args(topology: Topology, profile: str, time_scale: float) -> tuple[dict | None, str]:
    """The Serve app's args for a topology, or None and why the app cannot run it (an AppArgs
    without the field the topology needs)."""
    from cluster.args import AppArgs

    args = {"simulate": profile, "simulate_time_scale": time_scale, "num_stages": topology.stages}
    for name, value in (("num_replicas", topology.replicas), ("cfg_parallel", topology.cfg_parallel)):
        if value > 1:
            if name not in AppArgs.model_fields:
                return None, f"the app has no '{name}' yet (AppArgs): run in analytic mode only"
            args[name] = value
    return args, ""


def analytic(config: BagelConfig, profile: Profile, topologies: list[Topology], tasks: list[str],
             levels: list[int], size: int, steps: int, per_client: int) -> dict:
    tokenizer = demo_tokenizer()
    traces = {task: trace(config, tokenizer, task, size, steps) for task in tasks}
    out = {}
    for topology in topologies:
        runs = {}
        for task in tasks:
            for policy in ("fifo", "ready"):
                runs.setdefault(task, {})[policy] = {
                    str(c): summarize(Model(config, profile, topology, policy).run(traces, [task] * (per_client * c), c), c)
                    for c in levels}
        out[str(topology)] = runs
    return out


def serve(topologies: list[Topology], profile: str, tasks: list[str], levels: list[int], size: int, steps: int,
          per_client: int, time_scale: float, port: int) -> dict:
    """Each topology the app supports, deployed in turn on a local Ray instance."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import httpx
    import ray
    from ray import serve as ray_serve

    from cluster.app import build_app

    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    repo = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    url, out = f"http://127.0.0.1:{port}", {}
    try:
        for topology in topologies:
            args, why = app_args(topology, profile, time_scale)
            if args is None:
                out[str(topology)] = {"skipped": why}
                continue
            ray_serve.run(build_app(args), name="bagel", route_prefix="/", logging_config=quiet)
            try:
                _wait_healthy(httpx, url)
                out[str(topology)] = asyncio.run(_sweep(url, tasks, levels, size, steps, per_client, time_scale,
                                                        validate=str(topology) == "1x1x1" and profile == "h200"))
            finally:
                ray_serve.delete("bagel")
    finally:
        ray_serve.shutdown()
        ray.shutdown()
    return out


def _wait_healthy(httpx, url: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the app did not answer /health within {timeout_s} s")


async def _sweep(url: str, tasks: list[str], levels: list[int], size: int, steps: int, per_client: int,
                 time_scale: float, validate: bool) -> dict:
    """Closed-loop levels per task (latency, steady throughput, stage busy fractions), in
    simulated seconds; with `validate`, first the measured request of VALIDATION, three times."""
    import httpx

    from bench.loadtest import HttpTarget, Workload, closed_loop

    class _NoProgress:
        def update(self, n: int) -> None:
            pass

    result: dict = {}
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        if validate:
            body = {k: v for k, v in json.loads((RESULTS / VALIDATION).read_text())["settings"].items()
                    if k in ("prompt", "size", "num_timesteps", "cfg_text_scale", "cfg_img_scale", "cfg_interval",
                             "timestep_shift", "cfg_renorm_type", "seed")}
            seconds = []
            for _ in range(3):  # as measured: the median of the requests after the first
                t = time.perf_counter()
                (await client.post("/v1/images/generations", json=body)).raise_for_status()
                seconds.append((time.perf_counter() - t) / time_scale)
            result["validation_request_s"] = seconds
        for task in tasks:
            workload = Workload({task: 1.0}, size=size, steps=steps)
            target = HttpTarget(client, workload)
            for c in levels:
                before, t0 = await target.health(), time.perf_counter()
                samples, elapsed = await closed_loop(target, workload, c, per_client * c, 1e9, random.Random(c),
                                                     _NoProgress())
                after, dt = await target.health(), time.perf_counter() - t0
                errors = [s.error for s in samples if not s.ok]
                if errors:
                    raise RuntimeError(f"{task} at concurrency {c}: errors {errors}")
                latencies = sorted((s.end_s - s.start_s) / time_scale for s in samples)
                steady = steady_throughput([s.end_s / time_scale for s in samples], c)
                result.setdefault(task, {})[str(c)] = {
                    "requests": len(samples), "latency_s": {"p50": latencies[len(latencies) // 2],
                                                            "mean": sum(latencies) / len(latencies)},
                    "throughput_per_min": 60 * (steady or len(samples) / (elapsed / time_scale)),
                    "stage_busy_fraction": [(a["busy_s"] - b["busy_s"]) / dt
                                            for a, b in zip(after["stages"], before["stages"])],
                    "live_contexts_after": sum(s["live_contexts"] for s in after["stages"]),
                    "load_average_1min": os.getloadavg()[0],
                }
    return result


def validation(config: BagelConfig, profile: Profile, serve_runs: dict) -> dict | None:
    """The h200 1x1x1 text-to-image prediction against our measured Serve latency, for the
    measured request's size and steps."""
    if profile.name != "h200":
        return None
    measured = json.loads((RESULTS / VALIDATION).read_text())
    settings = measured["settings"]
    size = int(settings["size"].split("x")[0])
    calls = trace(config, demo_tokenizer(), "t2i", size, settings["num_timesteps"])
    model = summarize(Model(config, profile, Topology()).run({"t2i": calls}, ["t2i"], 1), 1)
    rest = sorted(measured["request_s"][1:])  # as reported: the median of the requests after the first
    out = {"measured_file": VALIDATION, "measured_s": rest[len(rest) // 2], "measured_device": measured["device"],
           "analytic_s": model["latency_s"]["p50"]}
    runs = serve_runs.get("1x1x1", {})
    if "validation_request_s" in runs:
        rest = sorted(runs["validation_request_s"][1:])
        out["serve_s"] = rest[len(rest) // 2]
    for key in ("analytic", "serve"):
        if f"{key}_s" in out:
            out[f"{key}_error"] = out[f"{key}_s"] / out["measured_s"] - 1
    return out


def targets(analytic_runs: dict, serve_runs: dict, levels: list[int]) -> list[dict]:
    """The issue's targets: latency at concurrency 1, throughput at the highest level, against 1x1x1."""
    rows = []
    low, high = str(min(levels)), str(max(levels))
    for what, task, topology, measure, bound in TARGETS:
        row = {"target": what, "topology": topology, "task": task, "bound": bound}
        for source, runs in (("analytic", {t: r.get(task, {}).get("fifo") for t, r in analytic_runs.items()}),
                             ("analytic_ready", {t: r.get(task, {}).get("ready") for t, r in analytic_runs.items()}),
                             ("serve", {t: r.get(task) for t, r in serve_runs.items()})):
            base, mine = runs.get("1x1x1"), runs.get(topology)
            if not base or not mine:
                continue
            if measure == "latency":
                ratio = mine[low]["latency_s"]["p50"] / base[low]["latency_s"]["p50"]
                row[source] = {"ratio": ratio, "met": ratio <= bound}
            else:
                ratio = mine[high]["throughput_per_min"] / base[high]["throughput_per_min"]
                row[source] = {"ratio": ratio, "met": ratio >= bound}
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    """The README table: per topology and task, latency at concurrency 1 and throughput at the
    highest level, Serve mode where the app runs it and the analytic model everywhere."""
    levels = report["settings"]["concurrency"]
    low, high = str(min(levels)), str(max(levels))
    lines = [f"| topology (R x C x S) | GPUs | task | latency c={low}: Serve / model | images/min c={high}: "
             f"Serve / model / model, ready-first | fits {report['profile']['name']} |", "|---|---|---|---|---|---|"]
    for name, entry in report["topologies"].items():
        for task in report["settings"]["tasks"]:
            model = entry["analytic"].get(task, {}) if entry.get("analytic") else {}
            served = entry.get("serve", {}).get(task) if isinstance(entry.get("serve"), dict) else None
            lat = f"{served[low]['latency_s']['p50']:.2f}" if served else "–"
            thr = f"{served[high]['throughput_per_min']:.2f}" if served else "–"
            if model:
                lat += f" / {model['fifo'][low]['latency_s']['p50']:.2f} s"
                thr += f" / {model['fifo'][high]['throughput_per_min']:.2f} / {model['ready'][high]['throughput_per_min']:.2f}"
            lines.append(f"| {name} | {entry['gpus']} | {task} | {lat} | {thr} | "
                         f"{'yes' if entry['memory']['fits'] else 'no'} |")
    lines += ["", "| target | Serve | model | model, ready-first |", "|---|---|---|---|"]
    for row in report["targets"]:
        cells = [f"{row[s]['ratio']:.2f} ({'met' if row[s]['met'] else 'missed'})" if s in row else "–"
                 for s in ("serve", "analytic", "analytic_ready")]
        lines.append(f"| {row['target']} ({row['topology']}, {row['task']}; bound {row['bound']}) | " + " | ".join(cells) + " |")
    lines += ["", where_the_time_goes(report)]
    p = report["profile"]
    lines += ["", f"Profile {p['name']}: GEMM {p['gemm_tflops']:.0f} TFLOP/s, attention {p['attention_tflops']:.0f} "
              f"TFLOP/s, memory {p['memory_GBps']:.0f} GB/s, {p['layer_us']:.0f} µs per layer and call, "
              f"{p['token_layer_ns']:.0f} ns per token and layer, {p['denoise_call_ms']:.1f} ms per denoising call, "
              f"VAE {p['vae_tflops']:.0f} TFLOP/s, link {p['link']['GBps']:.0f} GB/s x {p['link']['copies']} "
              f"copies ({p['link']['name']})."]
    v = report.get("validation")
    if v:
        parts = [f"measured {v['measured_s']:.2f} s ({v['measured_file']})"]
        parts += [f"{k} {v[k + '_s']:.2f} s ({100 * v[k + '_error']:+.1f}%)" for k in ("serve", "analytic") if k + "_s" in v]
        lines += ["", "Validation, 1x1x1 text-to-image: " + ", ".join(parts) + "."]
    return "\n".join(lines) + "\n"


def where_the_time_goes(report: dict) -> str:
    """Host time (Serve minus the device-only model) at the lowest concurrency, per denoising
    step; at the highest, each stage GPU's busy share (Serve, model) and, in the model, the share
    it idled with work queued whose inputs did not exist yet (head-of-line waits) and the link's."""
    levels, steps = report["settings"]["concurrency"], report["settings"]["steps"] - 1
    low, high = str(min(levels)), str(max(levels))

    def shares(values) -> str:
        return " / ".join(f"{100 * v:.0f}" for v in values) + "%"

    lines = [f"| topology | task | host time c={low}: Serve - model (per step) | stage busy c={high}: Serve | "
             f"model: busy, waiting on inputs, link |", "|---|---|---|---|---|"]
    for name, entry in report["topologies"].items():
        for task in report["settings"]["tasks"]:
            model = (entry.get("analytic") or {}).get(task, {}).get("fifo")
            served = entry.get("serve", {}).get(task) if isinstance(entry.get("serve"), dict) else None
            if not model:
                continue
            host = busy = "–"
            if served:
                extra = served[low]["latency_s"]["p50"] - model[low]["latency_s"]["p50"]
                host, busy = f"{extra:.2f} s ({1e3 * extra / steps:.0f} ms)", shares(served[high]["stage_busy_fraction"])
            m = model[high]
            lines.append(f"| {name} | {task} | {host} | {busy} | {shares(m['stage_busy_fraction'].values())}, "
                         f"{shares(m['stage_blocked_fraction'].values())}, {shares(m['stage_link_fraction'].values())} |")
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    tasks, levels = report["settings"]["tasks"], report["settings"]["concurrency"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, task in enumerate(tasks):
        for i, (name, entry) in enumerate(report["topologies"].items()):
            color = colors[i % len(colors)]
            model = (entry.get("analytic") or {}).get(task)
            served = entry.get("serve", {}).get(task) if isinstance(entry.get("serve"), dict) else None
            for col, key in ((0, "latency"), (1, "throughput")):
                pick = (lambda r: r["latency_s"]["p50"]) if key == "latency" else (lambda r: r["throughput_per_min"])
                ax = axes[row][col]
                if model:
                    ax.plot(levels, [pick(model["fifo"][str(c)]) for c in levels], color=color, marker="o", label=f"{name} model")
                if served:
                    ax.plot(levels, [pick(served[str(c)]) for c in levels], color=color, marker="s", linestyle="--",
                            label=f"{name} Serve")
        axes[row][0].set(title=f"{task}: latency p50", xlabel="concurrency", ylabel="seconds", xscale="log", yscale="log")
        axes[row][0].yaxis.set_major_formatter(ScalarFormatter())
        axes[row][1].set(title=f"{task}: throughput", xlabel="concurrency", ylabel="images/min", xscale="log")
        axes[row][1].legend(fontsize=7, ncol=2)
        for ax in axes[row]:
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.minorticks_off()
    fig.suptitle(f"bagel-serve simulated on {report['profile']['name']} (model: analytic; Serve: the real app, simulated GPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="h200")
    p.add_argument("--topologies", default=TOPOLOGIES, help="comma-separated R x C x S (replicas, CFG groups, stages)")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--tasks", default="t2i,edit")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--modes", default="serve,analytic")
    p.add_argument("--requests-per-client", type=int, default=2, help="Serve mode: requests per client and level")
    p.add_argument("--model-requests-per-client", type=int, default=6, help="analytic mode: the same, cheaper")
    p.add_argument("--time-scale", type=float, default=1.0, help="Serve mode: real seconds per simulated second")
    p.add_argument("--port", type=int, default=0, help="Serve mode's HTTP port (0: a free one)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--name", default=None, help="report file name without extension (default simulate_<profile>)")
    p.add_argument("--redraw", action="store_true", help="only rewrite the table and chart from the JSON report")
    args = p.parse_args(argv)
    name, out = args.name or f"simulate_{args.profile}", Path(args.out)
    if args.redraw:
        return _write_views(json.loads((out / f"{name}.json").read_text()), out, name)
    topologies = [Topology.parse(t) for t in args.topologies.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    tasks = args.tasks.split(",")
    modes = set(args.modes.split(","))
    config, profile = BagelConfig(), load_profile(args.profile)
    memory = {str(t): stage_memory(config, profile, t) for t in topologies}
    fitting = [t for t in topologies if memory[str(t)]["fits"]]

    started, load = time.perf_counter(), os.getloadavg()
    model = analytic(config, profile, fitting, tasks, levels, args.size, args.steps,
                     args.model_requests_per_client) if "analytic" in modes else {}
    served = serve(fitting, args.profile, tasks, levels, args.size, args.steps, args.requests_per_client,
                   args.time_scale, args.port) if "serve" in modes else {}
    report = {
        "benchmark": "simulate", "device": f"simulated {profile.name} on {platform.machine()} CPU",
        "python": platform.python_version(), "commit": commit(),
        "settings": {"topologies": [str(t) for t in topologies], "concurrency": levels, "tasks": tasks,
                     "size": args.size, "steps": args.steps, "modes": sorted(modes), "time_scale": args.time_scale,
                     "requests_per_client": args.requests_per_client,
                     "model_requests_per_client": args.model_requests_per_client},
        "profile": profile.summary(), "wall_s": time.perf_counter() - started,
        "load_average": {"start": load, "end": os.getloadavg()},  # the Serve mode's host work runs on this CPU
        "topologies": {str(t): {"gpus": t.gpus, "memory": memory[str(t)],
                                **({"analytic": model[str(t)]} if str(t) in model else {}),
                                **({"serve": served[str(t)]} if str(t) in served else {}),
                                **({} if memory[str(t)]["fits"] else
                                   {"skipped": f"a stage's weights do not fit {profile.name}'s memory"})}
                       for t in topologies},
    }
    report["validation"] = validation(config, profile, served)
    report["targets"] = targets(model, {k: v for k, v in served.items() if "skipped" not in v}, levels)
    write_report(report, out, f"{name}.json")
    return _write_views(report, out, name)


def _write_views(report: dict, out: Path, name: str) -> int:
    table = markdown(report)
    (out / f"{name}.md").write_text(table)
    chart(report, out / f"{name}.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
