"""`bagel serve`, `bagel config` and `bagel loadtest`: the Ray Serve application on this machine.

The Serve config ships inside the package (cluster/ray_config.yaml), so `bagel serve` works from
any folder; `bagel config` writes a copy to edit. `bagel serve` starts (or joins, with
RAY_ADDRESS) a Ray cluster, deploys the application, waits until /health says it is ready (the
service warms up first) and blocks until interrupted. Command-line flags override the config's
`args`. It refuses to listen on a non-loopback address without an API key unless told to.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

from .errors import CliError
from .plan import quantize_arg, quantize_choices

DEFAULT_CONFIG_NAME = "ray_config.yaml"


def packaged_config() -> str:
    """The default Serve config's text, as shipped in the `cluster` package."""
    return resources.files("cluster").joinpath(DEFAULT_CONFIG_NAME).read_text()


# --------------------------------------------------------------------------- bagel config


def add_config(subparsers) -> None:
    p = subparsers.add_parser("config", help="write an editable copy of the Serve config",
                              description="Write the default Serve config (ray_config.yaml, as shipped) to PATH, "
                                          "to edit and use with `bagel serve --config PATH`, `serve run PATH` or "
                                          "`serve deploy PATH`.")
    p.add_argument("path", nargs="?", default=DEFAULT_CONFIG_NAME, metavar="PATH",
                   help="where to write it; '-' prints it (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite PATH if it exists")
    p.set_defaults(run=run_config)


def run_config(args: argparse.Namespace) -> int:
    text = packaged_config()
    if args.path == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.path)
    if path.exists() and not args.force:
        raise CliError(f"{path} exists; pass --force to overwrite it")
    try:
        path.write_text(text)
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from e
    print(f"wrote {path}: edit it, then `bagel serve --config {path}`", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- bagel serve


def add_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="start the HTTP service (OpenAI-compatible API)",
                              description="Start the HTTP service (the Ray Serve application) on this machine and "
                                          "block until interrupted.")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="Serve config file (default: the packaged one; `bagel config` writes a copy to edit)")
    p.add_argument("--host", default=None,
                   help="listen address (default: the config's http_options.host, 127.0.0.1 as shipped)")
    p.add_argument("--port", type=int, default=None, help="port (default: the config's http_options.port)")
    p.add_argument("--checkpoint", default=None, help="BAGEL checkpoint folder (default: config, $BAGEL_CHECKPOINT, demo)")
    p.add_argument("--num-stages", type=_stages, default=None, help="MoT pipeline stages, or auto")
    p.add_argument("--quantize", choices=quantize_choices(), default=None,
                   help="weight format of the LLM's linear layers (default: the config's): none (exact bf16), "
                        "df11 (lossless), int8, nf4, fp8 (APPROXIMATE), auto (the memory planner's choice)")
    p.add_argument("--num-replicas", type=int, default=None, help="independent pipelines (Serve replicas)")
    p.add_argument("--cfg-parallel", type=int, default=None, choices=(1, 2, 3),
                   help="branch groups per replica: CFG branches run at once")
    p.add_argument("--allow-no-api-key", action="store_true",
                   help="listen on a non-loopback address without an API key (anyone who reaches the port may "
                        "use the service)")
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

    if args.config and not Path(args.config).is_file():
        raise CliError(f"config file not found: {args.config} (`bagel config {args.config}` writes one)")
    config = yaml.safe_load(Path(args.config).read_text() if args.config else packaged_config())
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

    from cluster.args import AppArgs

    validated = AppArgs(**app_args)
    if not _is_loopback(host):
        if not validated.api_key and not args.allow_no_api_key:
            raise CliError(f"refusing to listen on {host} without an API key: anyone who can reach port {port} "
                           "could use the service. Set api_key in the config (or $BAGEL_API_KEY), listen on "
                           "127.0.0.1, or pass --allow-no-api-key")
        if not validated.api_key:
            print(f"WARNING: listening on {host} without an API key", file=sys.stderr, flush=True)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.plan import with_plan

    repo = str(Path(__file__).resolve().parent.parent)  # workers import the project as this process does
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
    _stop_on_signals()
    url = f"http://{_reachable(host)}:{port}"
    model = validated.checkpoint_dir or "the built-in demo model (RANDOM weights: outputs are noise)"
    if validated.simulate:
        model = f"SIMULATED {validated.simulate} GPUs (no model: outputs are noise)"
    print(f"bagel-serve: {model}, topology {validated.topology} (replicas x cfg_parallel x stages) on {url}"
          f"{' (every interface)' if _is_any(host) else ''}; warming up...", flush=True)
    try:
        _wait_ready(url)
        print(f"bagel-serve is ready on {url}\n  try: curl {url}/health   (Ctrl-C stops it)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (service managers, `docker stop`) both shut Serve and Ray down; a
    background job may have inherited an ignored SIGINT."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


def _is_any(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _reachable(host: str) -> str:
    """An address a local client can use: the loopback for "every interface"."""
    if _is_any(host):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _wait_ready(url: str, poll_s: float = 0.5) -> None:
    """Poll /health until it says ready, printing each state it passes through."""
    last = None
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10):
                return
        except urllib.error.HTTPError as e:  # 503: starting, degraded or failed
            try:
                body = json.loads(e.read())
                state = f"{body.get('status')}: {body.get('error') or body.get('detail') or ''}".rstrip(": ")
            except ValueError:
                state = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:  # the proxy does not route to the app yet
            state = f"not answering yet ({getattr(e, 'reason', e)})"
        if state != last:
            print(f"  /health: {state}", flush=True)
            last = state
        time.sleep(poll_s)


# --------------------------------------------------------------------------- bagel loadtest


def add_loadtest(subparsers) -> None:
    """`bagel loadtest ARGS` is `python -m bench.loadtest ARGS`: its arguments are parsed there,
    so that building this parser imports nothing of the load tester (httpx, numpy)."""
    p = subparsers.add_parser("loadtest", help="load-test a running service (bench/loadtest.py; `bagel loadtest "
                              "--help` for its options)", add_help=False, prefix_chars="\0")
    p.add_argument("arguments", nargs=argparse.REMAINDER)
    p.set_defaults(run=run_loadtest)


def run_loadtest(args: argparse.Namespace) -> int:
    from bench import loadtest

    try:
        return loadtest.main(args.arguments, prog="bagel loadtest")
    except SystemExit as e:  # its --help, or a bad argument (argparse printed why)
        return e.code if isinstance(e.code, int) else 2
