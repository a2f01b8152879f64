"""Warm start and Serve overhead: the Serve app on one device (N MoT stages + encoder + decoder
sharing the GPU; the full-size BAGEL-7B-MoT architecture with random bf16 weights, or
--checkpoint), one text-to-image request at a time over HTTP once the service says it is ready,
against the same request in process. Writes a JSON report. (Topologies, throughput and output
agreement across layouts: bench/serve_gpu.py.)

    python -m bench.serve_overhead --stages 1 --in-process --requests 3 --out bench/results

It records: how soon /health answers after deploying and how long until ready (workers built
and warmed up); the first request after ready against the steady state (median of the later
ones; target <= 1.2x); where each request's time went, from the server's Server-Timing header
(queue, prefill, denoise, vae_decode, encode_output, respond, ...; `other` is the server's time outside
those phases and `http` the client's time beyond the server's total); with --in-process, the same
request through the in-process executor on the same device first, and the Serve overhead
(steady-state request time over in-process time, target <= 5%). --device cpu with a small
--checkpoint runs it all on the CPU in seconds (its test).
"""
from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import os
import platform
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from bench.provenance import commit, write_report

PROMPT = "A red fox sitting in a snowy forest at sunset."  # the sampler knobs: text-to-image defaults


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: random full-size weights)")
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--stage-memory-gib", type=float, default=24.0, help="GPU memory cap of each stage (> 1 stage)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--requests", type=int, default=4, help="text-to-image requests after ready (>= 2)")
    p.add_argument("--in-process", action="store_true",
                   help="first time the same request in this process (same device) for the overhead")
    p.add_argument("--no-warmup", action="store_true", help="deploy without warm-up (to see its effect)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--suffix", default="", help="added to the report's file name")
    p.add_argument("--loadtest", default=None,
                   help="then run bench.loadtest with these arguments (quoted), e.g. '--concurrency 1,2 --size 512'")
    args = p.parse_args(argv)
    if args.requests < 2:
        p.error("--requests must be at least 2 (the first after ready, then the steady state)")
    import prometheus_client  # noqa: F401  (the app needs it: fail here, not in a replica)

    from pipelines.params import ImageParams

    settings = {"prompt": PROMPT, **vars(ImageParams(num_timesteps=args.steps, height=args.size, width=args.size)),
                "seed": 0}
    report = {"benchmark": "serve_overhead_t2i", "device": _device_name(args.device), "torch": torch.__version__,
              "python": platform.python_version(), "commit": commit(), "settings": settings}
    if args.in_process:
        report["in_process_s"] = in_process(args)
    report.update(served(args))
    steady = statistics.median(report["request_s"][1:])
    report["steady_request_s"] = steady
    report["first_over_steady"] = report["request_s"][0] / steady  # target <= 1.2
    if args.in_process:
        in_process_s = statistics.median(report["in_process_s"][1:])
        report["in_process_median_s"] = in_process_s
        report["overhead_fraction"] = steady / in_process_s - 1  # target <= 0.05
    report["breakdown_s"] = {phase: statistics.median(r[phase] for r in report["phases_s"][1:])
                             for phase in report["phases_s"][0]}
    name = f"serve_overhead_{args.stages}stages_{args.size}{args.suffix}.json"
    write_report(report, Path(args.out), name)
    print(json.dumps({k: v for k, v in report.items() if k not in ("stages_after", "stages_at_start")}))
    return 0


def in_process(args) -> list[float]:
    """Seconds per text-to-image through `LocalExecutor` (the first run warms up); the executor
    is gone afterwards, its memory freed for the served run."""
    from bagel_model.kernels import select_kernels
    from bench.latency import build
    from pipelines.noise import NoiseSource
    from pipelines.params import ImageParams
    from pipelines.tasks import generate_image

    executor = build(args.checkpoint, args.device, graphs=None, kernels=select_kernels(args.device))  # as a stage
    params = ImageParams(num_timesteps=args.steps, height=args.size, width=args.size)
    runs = []
    for _ in range(args.requests):
        _sync(args.device)
        start = time.perf_counter()
        generate_image(executor, [PROMPT], params, noise=NoiseSource(0))
        _sync(args.device)
        runs.append(time.perf_counter() - start)
    del executor
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return runs


def served(args) -> dict:
    """Deploy, wait for ready, send the requests; the Serve part of the report."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from cluster.app import build_app

    app_args = _app_args(args)
    repo = str(Path(__file__).resolve().parent.parent)
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, num_gpus=1 if args.device == "cuda" else 0,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", repo)}})
    url = f"http://127.0.0.1:{args.port}"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        ray_s = time.perf_counter() - t0
        serve.run(build_app(app_args), name="bagel", route_prefix="/")
        deployed_s = time.perf_counter() - t0
        first_answer_s, health = None, None
        while True:  # /health: 503 "starting" at once, 200 once warm
            status, health = _get_json(f"{url}/health")
            if status is not None and first_answer_s is None:
                first_answer_s = time.perf_counter() - t0
            if status == 200:
                break
            time.sleep(0.1)
        ready_s = time.perf_counter() - t0
        body = {"prompt": PROMPT, "size": f"{args.size}x{args.size}", "num_timesteps": args.steps, "seed": 0}
        runs, busy, phases = [], [], []
        for _ in range(args.requests):
            before = _get_json(f"{url}/health")[1]["stages"]
            start = time.perf_counter()
            response, headers = _post_json(f"{url}/v1/images/generations", body)
            runs.append(time.perf_counter() - start)
            phases.append(_breakdown(headers.get("Server-Timing", ""), runs[-1]))
            after = _get_json(f"{url}/health")[1]["stages"]
            busy.append(max(a["busy_s"] - b["busy_s"] for a, b in zip(after, before)))
        from PIL import Image

        image = Image.open(io.BytesIO(base64.b64decode(response["data"][0]["b64_json"])))
        final = _get_json(f"{url}/health")[1]
        if args.loadtest:
            from bench import loadtest

            loadtest.main([*args.loadtest.split(), "--url", url, "--quiet",
                           "--out", str(Path(args.out) / f"loadtest_{args.stages}stages{args.suffix}")])
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "ray": ray.__version__,
        "app_args": {k: v for k, v in app_args.items() if k != "checkpoint_dir"},
        "ray_start_s": ray_s, "deployed_s": deployed_s,  # serve.run returned (replica constructors done)
        "health_first_answer_s": first_answer_s,  # /health's first HTTP answer (503 starting)
        "ready_s": ready_s, "warmup_s": health.get("warmup_s"),
        "request_s": runs, "image_size": list(image.size),
        "stage_busy_s": busy,  # per request: the busiest stage's compute time
        "phases_s": phases,  # per request: the server's phases, "other" and "http"
        "usage": response.get("usage"),
        "stages_at_start": health["stages"], "stages_after": final["stages"],
        "live_contexts_after": sum(s["live_contexts"] for s in final["stages"]),
    }


def _app_args(args) -> dict:
    folder = args.checkpoint
    if folder is None:  # the full-size architecture's configs; weights made on the device
        from bagel_model.config import BagelConfig
        from bagel_model.demo import demo_tokenizer, write_config_folder

        folder = write_config_folder(Path(tempfile.mkdtemp()) / "bagel-7b-config", BagelConfig(), demo_tokenizer())
    app_args = {"checkpoint_dir": str(folder), "random_weights": args.checkpoint is None, "num_stages": args.stages,
                "device": args.device, "warmup": {"sizes": [] if args.no_warmup else [f"{args.size}x{args.size}"]}}
    if args.device == "cuda":
        from cluster.topology import Topology, gpu_shares

        total = torch.cuda.get_device_properties(0).total_memory
        shares = gpu_shares(Topology(replicas=1, branch_groups=1, stages=args.stages), 1)
        app_args.update({"dtype": "bfloat16", "gpus_per_stage": shares.stage, "encoder_gpus": shares.encoder,
                         "decoder_gpus": shares.decoder,
                         "stage_memory_fraction": None if args.stages == 1 else args.stage_memory_gib * 2**30 / total})
    else:
        app_args["dtype"] = "float32"
    return app_args


def _breakdown(server_timing: str, client_s: float) -> dict[str, float]:
    """Seconds per server phase, plus `other` (the server's total outside them) and `http` (the
    client's time beyond the server's total: proxy hops, transfer, parsing)."""
    phases = {}
    for part in filter(None, (p.strip() for p in server_timing.split(","))):
        name, _, duration = part.partition(";dur=")
        phases[name] = float(duration) / 1000
    total = phases.pop("total", sum(phases.values()))
    return {**phases, "other": total - sum(phases.values()), "http": client_s - total}


def _get_json(url: str) -> tuple[int | None, dict | None]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read())
        except ValueError:  # the proxy's own answer (no route yet): not the app's
            return None, None
        return e.code, body
    except (urllib.error.URLError, OSError):  # not routed to the app yet
        return None, None


def _post_json(url: str, body: dict):
    """The response's JSON and headers (case-insensitive)."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=1800) as r:
        return json.load(r), r.headers


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
