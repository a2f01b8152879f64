"""`bagel serve`: start the Ray Serve application from ray_config.yaml on this machine.

Starts (or joins, with RAY_ADDRESS) a Ray cluster, deploys the application and blocks until
interrupted. Command-line flags override the config's `args`.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .plan import quantize_arg, quantize_choices

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "ray_config.yaml"


def add_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="start the HTTP service (OpenAI-compatible API)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config file (default: %(default)s)")
    p.add_argument("--host", default=None, help="listen address (default: the config's http_options.host)")
    p.add_argument("--port", type=int, default=None, help="port (default: the config's http_options.port)")
    p.add_argument("--checkpoint", default=None, help="BAGEL checkpoint folder (default: config, $BAGEL_CHECKPOINT, demo)")
    p.add_argument("--num-stages", type=_stages, default=None, help="MoT pipeline stages, or auto")
    p.add_argument("--quantize", choices=quantize_choices(), default=None,
                   help="weight format of the LLM's linear layers (default: the config's): none (exact bf16), "
                        "df11 (lossless), int8, nf4, fp8 (APPROXIMATE), auto (the memory planner's choice)")
    p.add_argument("--num-replicas", type=int, default=None, help="independent pipelines (Serve replicas)")
    p.add_argument("--cfg-parallel", type=int, default=None, choices=(1, 2, 3),
                   help="branch groups per replica: CFG branches run at once")
    p.set_defaults(run=run_serve)


def _stages(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of stages or auto, got {text!r}") from None


def run_serve(args: argparse.Namespace) -> int:
    import yaml

    config = yaml.safe_load(Path(args.config).read_text())
    app = config["applications"][0]
    app_args = dict(app.get("args") or {})
    if args.checkpoint:
        app_args["checkpoint_dir"] = args.checkpoint
    if args.num_stages:
        app_args["num_stages"] = args.num_stages
    if args.quantize:
        app_args["quantize"] = quantize_arg(args.quantize)
    for key in ("num_replicas", "cfg_parallel"):
        if getattr(args, key):
            app_args[key] = getattr(args, key)
    http = config.get("http_options", {})
    host, port = args.host or http.get("host", "127.0.0.1"), args.port or http.get("port", 8000)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.args import AppArgs
    from cluster.plan import with_plan

    validated = AppArgs(**app_args)
    repo = str(Path(__file__).resolve().parent.parent)
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env)
    else:
        ray.init(address="local", include_dashboard=False, runtime_env=runtime_env)
    validated, plan = with_plan(validated, ray.cluster_resources().get("GPU", 0))
    if plan is not None:
        print(plan.describe(), flush=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(validated), name=app.get("name", "bagel"), route_prefix=app.get("route_prefix", "/"))
    checkpoint = validated.checkpoint_dir or "the built-in demo model (RANDOM weights: outputs are noise)"
    if validated.simulate:
        checkpoint = f"SIMULATED {validated.simulate} GPUs (no model: outputs are noise)"
    print(f"bagel-serve is up on http://{host}:{port} with {checkpoint}, topology {validated.topology} "
          f"(replicas x cfg_parallel x stages).\n"
          f"  try: curl http://{host}:{port}/health   (Ctrl-C stops it)", flush=True)
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0


def add_loadtest(subparsers) -> None:
    from bench import loadtest

    p = subparsers.add_parser("loadtest", help="load-test a running service (bench/loadtest.py)",
                              description=loadtest.__doc__.splitlines()[0])
    loadtest.add_arguments(p)
    p.set_defaults(run=run_loadtest)


def run_loadtest(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from bench import loadtest

    report = asyncio.run(loadtest.run(args))
    written = loadtest.write_report(report, Path(args.out))
    levels = [{k: v for k, v in level.items() if k not in ("samples", "per_task")} for level in report["levels"]]
    print(json.dumps(levels, indent=1))
    print("report:", ", ".join(str(p) for p in written))
    return 0
