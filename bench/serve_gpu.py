"""Run the Serve app on one GPU with the full-size BAGEL-7B-MoT architecture and random bf16
weights: N MoT stages + encoder + decoder sharing the GPU, each stage process capped at a GPU
memory budget; one text-to-image request over HTTP. Writes a JSON report and the log.

    python -m bench.serve_gpu --out bench/results --stages 3 --stage-memory-gib 24
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.provenance import commit, write_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--stage-memory-gib", type=float, default=24.0)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--suffix", default="", help="added to the report's file name")
    p.add_argument("--requests", type=int, default=3, help="text-to-image requests (the first warms up)")
    p.add_argument("--loadtest", default=None,
                   help="then run bench.loadtest with these arguments (quoted), e.g. '--concurrency 1,2 --size 512'")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import httpx
    import ray
    from PIL import Image
    from ray import serve

    from bagel_model.config import BagelConfig
    from bagel_model.demo import demo_tokenizer, write_config_folder
    from cluster.app import build_app
    from cluster.args import gpu_shares
    from pipelines.params import ImageParams

    total = torch.cuda.get_device_properties(0).total_memory
    fraction = args.stage_memory_gib * 2**30 / total
    folder = write_config_folder(Path(tempfile.mkdtemp()) / "bagel-7b-config", BagelConfig(), demo_tokenizer())
    stage_share, encoder_share, decoder_share = gpu_shares(args.stages, 1)
    fraction = None if args.stages == 1 else fraction  # one stage: the whole model, no cap
    app_args = {"checkpoint_dir": str(folder), "random_weights": True, "num_stages": args.stages,
                "device": "cuda", "dtype": "bfloat16", "gpus_per_stage": stage_share, "encoder_gpus": encoder_share,
                "decoder_gpus": decoder_share, "stage_memory_fraction": fraction}
    t0 = time.perf_counter()
    repo = str(Path(__file__).resolve().parent.parent)
    ray.init(address="local", include_dashboard=False, num_gpus=1,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", repo)}})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(app_args), name="bagel", route_prefix="/")
    startup_s = time.perf_counter() - t0
    client = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=600)
    health = client.get("/health").json()
    body = {"prompt": "A red fox sitting in a snowy forest at sunset.", "size": f"{args.size}x{args.size}",
            "num_timesteps": args.steps, "seed": 0}  # the other sampler knobs: text-to-image defaults
    runs, busy = [], []
    for _ in range(args.requests):  # the first request also warms up kernels
        before = client.get("/health").json()["stages"]
        t = time.perf_counter()
        r = client.post("/v1/images/generations", json=body)
        runs.append(time.perf_counter() - t)
        r.raise_for_status()
        after = client.get("/health").json()["stages"]
        busy.append(max(a["busy_s"] - b["busy_s"] for a, b in zip(after, before)))
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    after = client.get("/health").json()
    report = {
        "benchmark": "serve_gpu_t2i", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "ray": ray.__version__, "python": platform.python_version(), "commit": commit(),
        "settings": {**vars(ImageParams(num_timesteps=args.steps)), **body,
                     **{k: v for k, v in app_args.items() if k != "checkpoint_dir"},
                     "architecture": "BAGEL-7B-MoT (random bf16 weights)", "stage_memory_gib": args.stage_memory_gib},
        "startup_s": startup_s, "request_s": runs, "image_size": list(image.size),
        "stage_busy_s": busy,  # per request: the busiest stage's compute time (the rest is overhead)
        "stages_after": after["stages"], "live_contexts_after": sum(s["live_contexts"] for s in after["stages"]),
        "stages_at_start": health["stages"],
    }
    out = Path(args.out)
    write_report(report, out, f"serve_gpu_{args.stages}stages_{args.size}{args.suffix}.json")
    print(json.dumps(report))
    if args.loadtest:
        from bench import loadtest

        loadtest.main([*args.loadtest.split(), "--url", f"http://127.0.0.1:{args.port}",
                       "--out", str(out / f"loadtest_{args.stages}stages{args.suffix}"), "--quiet"])
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
