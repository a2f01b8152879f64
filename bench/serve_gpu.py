"""Run the Serve app on one GPU with the full-size BAGEL-7B-MoT architecture and random bf16
weights in one or more topologies (replicas x cfg_parallel x stages), every process sharing the
GPU (stage processes capped at a GPU memory budget when there are several stages): placement
(/health of every replica), the links tensors take, latency of text-to-image (and editing) over
HTTP, throughput at a concurrency, and, with --reference, the same requests on the serial
topology 1x1xS (deployed once per stage count) to show the outputs agree. Writes a JSON report
per topology.

    python -m bench.serve_gpu --out bench/results --topology 1x2x1 --edit --concurrency 4 --reference
    python -m bench.serve_gpu --topology 2x1x1,1x2x1,1x3x1,1x2x2 --size 512 --steps 8 --edit --reference
    python -m bench.serve_gpu --stages 3 --stage-memory-gib 24          # one pipeline of 3 stages

On a CPU machine (`--device cpu --checkpoint DIR`, float32, the checkpoint's own weights) it
runs end to end on a tiny model (tests/test_bench.py).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.provenance import commit, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--topology", default=None, help="REPLICASxCFG_PARALLELxSTAGES, or several comma-separated "
                   "(default: 1x1x--stages)")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--stage-memory-gib", type=float, default=24.0, help="cap per stage process with several stages")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--suffix", default="", help="added to the report's file name")
    p.add_argument("--requests", type=int, default=3, help="text-to-image requests one after another (the first warms up)")
    p.add_argument("--edit", action="store_true", help="also time edits (the first warms up)")
    p.add_argument("--concurrency", type=int, default=0, help="then this many text-to-image requests at once")
    p.add_argument("--reference", action="store_true", help="then the same requests on 1x1xS: output differences")
    p.add_argument("--compile", default="auto", choices=("auto", "off"),
                   help="off: no torch.compile'd kernels in the stages (saves each process's compile time)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--checkpoint", default=None, help="a real checkpoint (default: the 7B shapes, random weights)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from bagel_model.config import BagelConfig
    from bagel_model.demo import demo_tokenizer, write_config_folder
    from pipelines.params import EDIT_DEFAULTS, ImageParams

    topologies = [tuple(map(int, t.split("x"))) for t in (args.topology or f"1x1x{args.stages}").split(",")]
    gpu = args.device == "cuda"
    own_ray = not ray.is_initialized()
    t0 = time.perf_counter()
    if own_ray:
        repo = str(Path(__file__).resolve().parent.parent)
        ray.init(address="local", include_dashboard=False, num_gpus=1 if gpu else 0,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", repo)}})
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    if args.checkpoint:
        folder = args.checkpoint
    else:
        folder = str(write_config_folder(Path(tempfile.mkdtemp()) / "bagel-7b-config", BagelConfig(), demo_tokenizer()))
    base = {"checkpoint_dir": folder, "random_weights": not args.checkpoint, "device": args.device,
            "dtype": "bfloat16" if gpu else "float32", "limits": {"max_num_timesteps": max(200, args.steps)}}
    if args.compile == "off":
        base["compile"] = False
    client_url = f"http://127.0.0.1:{args.port}"
    # The other sampler knobs: each task's defaults (pipelines/params.py).
    t2i = {"prompt": "A red fox sitting in a snowy forest at sunset.", "size": f"{args.size}x{args.size}",
           "num_timesteps": args.steps, "seed": 0}
    edit = {"prompt": "Make it look like winter at night.", "image": _input_image(args.size),
            "num_timesteps": args.steps, "seed": 0}
    references: dict[int, dict] = {}  # stage count -> the serial topology's run

    reports = []
    for replicas, groups, stages in topologies:
        app = dict(base)
        if gpu and stages > 1 and args.stage_memory_gib:
            app["stage_memory_fraction"] = args.stage_memory_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory
        report = {
            "benchmark": "serve_gpu_topology", "device": torch.cuda.get_device_name(0) if gpu else platform.processor(),
            "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(), "commit": commit(),
            "topology": f"{replicas}x{groups}x{stages}",
            "purpose": "every process shares one GPU: proves placement, links and outputs of the topology; "
                       f"it cannot be faster than 1x1x{stages} here ({args.size}², {args.steps} steps, "
                       f"compile {args.compile})",
            "settings": {"t2i": {**vars(ImageParams(num_timesteps=args.steps)), **t2i},
                         "edit": {**vars(replace(EDIT_DEFAULTS, num_timesteps=args.steps)),
                                  **{k: v for k, v in edit.items() if k != "image"}}, "edit_input_size": args.size,
                         **{k: v for k, v in app.items() if k != "checkpoint_dir"},
                         "stage_memory_gib": args.stage_memory_gib if "stage_memory_fraction" in app else None,
                         "architecture": "BAGEL-7B-MoT (random bf16 weights)" if not args.checkpoint else args.checkpoint},
        }
        start = time.perf_counter()
        run = _run_app({**app, "num_replicas": replicas, "cfg_parallel": groups, "num_stages": stages}, client_url,
                       t2i, edit if args.edit else None, args.requests, args.concurrency, replicas)
        report.update(startup_s=time.perf_counter() - (t0 if not reports else start), **run)
        if args.reference and (replicas, groups) != (1, 1):
            if stages not in references:
                references[stages] = _run_app({**app, "num_stages": stages}, client_url, t2i,
                                              edit if args.edit else None, 1, 0, 1)
            ref = references[stages]
            report["reference"] = {"topology": f"1x1x{stages}", "request_s": ref["request_s"], "edit_s": ref["edit_s"],
                                   "t2i": _compare(run["images"]["t2i"], ref["images"]["t2i"])}
            if args.edit:
                report["reference"]["edit"] = _compare(run["images"]["edit"], ref["images"]["edit"])
        report.pop("images")
        name = f"serve_gpu_{stages}stages_{args.size}" if (replicas, groups) == (1, 1) else \
            f"serve_gpu_{replicas}x{groups}x{stages}_{args.size}"
        write_report(report, Path(args.out), f"{name}{args.suffix}.json")
        print(json.dumps({k: v for k, v in report.items() if k not in ("settings", "replicas")}), flush=True)
        reports.append(report)
    if own_ray:
        serve.shutdown()
        ray.shutdown()
    return reports


def _run_app(app_args: dict, url: str, t2i: dict, edit: dict | None, requests: int, concurrency: int,
             replicas: int) -> dict:
    """Deploy, time the requests, undeploy. Returns timings, /health of every replica and the
    last images."""
    import httpx
    from ray import serve

    from cluster.app import build_app

    start = time.perf_counter()
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    out: dict = {"deploy_s": time.perf_counter() - start, "request_s": [], "stage_busy_s": [], "edit_s": [],
                 "images": {}}
    try:
        with httpx.Client(base_url=url, timeout=900) as client:
            out["replicas"] = _healths(client, replicas)
            out["links"] = next(iter(out["replicas"].values()))["links"]
            for _ in range(requests):  # the first request also warms up kernels
                before = client.get("/health").json()
                t = time.perf_counter()
                out["images"]["t2i"] = _image(client.post("/v1/images/generations", json=t2i))
                out["request_s"].append(time.perf_counter() - t)
                after = client.get("/health").json()
                if replicas == 1:  # per request: the busiest stage's compute time (the rest is overhead)
                    out["stage_busy_s"].append(max(a["busy_s"] - b["busy_s"]
                                                   for a, b in zip(after["stages"], before["stages"])))
            for _ in range(2 if edit and requests > 1 else 1 if edit else 0):
                t = time.perf_counter()
                out["images"]["edit"] = _image(client.post("/v1/images/edits", json=edit))
                out["edit_s"].append(time.perf_counter() - t)
            if concurrency:
                out["throughput"] = _throughput(client, t2i, concurrency)
            after = _healths(client, replicas)
            out["live_contexts_after"] = sum(s["live_contexts"] for h in after.values() for s in h["stages"])
    finally:
        serve.delete("bench")
    return out


def _throughput(client, body: dict, n: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []

    def one() -> None:
        t = time.perf_counter()
        r = client.post("/v1/images/generations", json={**body, "seed": None})
        (latencies if r.status_code == 200 else errors).append(time.perf_counter() - t if r.status_code == 200
                                                               else f"{r.status_code}: {r.text[:200]}")

    start = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"concurrency": n, "wall_s": wall, "images_per_min": 60 * len(latencies) / wall,
            "latency_s": sorted(latencies), "errors": errors}


def _healths(client, replicas: int, timeout_s: float = 120) -> dict[int, dict]:
    """/health of every replica, with the placement of each worker."""
    seen: dict = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < replicas and time.monotonic() < deadline:
        r = client.get("/health")
        if r.status_code == 200:
            doc = r.json()
            seen[doc["replica"]] = {"topology": doc["topology"], "links": doc["links"], "stages": [
                {k: s[k] for k in ("replica", "branch_group", "stage", "pid", "layers", "gpu_memory_bytes", "busy_s",
                                   "live_contexts")} for s in doc["stages"]]}
    if len(seen) < replicas:
        raise RuntimeError(f"only replicas {sorted(seen)} of {replicas} answered /health")
    return seen


def _image(response) -> np.ndarray:
    response.raise_for_status()
    png = base64.b64decode(response.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _compare(a: np.ndarray, b: np.ndarray) -> dict:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    mse = float((diff**2).mean())
    return {"max_pixel_diff": int(diff.max()), "mean_pixel_diff": float(diff.mean()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))}


def _input_image(size: int) -> str:
    x = np.linspace(0, 255, size)[None, :].repeat(size, 0)
    rgb = np.stack([x, x.T, 255 - (x + x.T) / 2], axis=-1).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


if __name__ == "__main__":
    main()
