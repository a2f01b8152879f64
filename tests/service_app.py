"""Starting the Serve application in tests: one local Ray instance per test session, one app at
a time on a loopback port, and small HTTP helpers (SSE lines, health polling, PNG pixels).

Ray on a small machine (see the tools README): `address="local"` with `num_cpus=2`, no
dashboard, usage stats and auth off, and every deployment/actor with `num_cpus=0` (the app
already asks for that). Workers import the project from this checkout: the repository root is
put on their PYTHONPATH (an editable install works as well). Never `ray stop`: shut down with
`serve.shutdown()` / `ray.shutdown()`.
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_NAME = "bagel"
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Serve's logs: warnings and errors only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[str]:
    """A local Ray instance and Serve's HTTP proxy on a free loopback port; yields the base URL."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process: one Ray instance per test session")
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@contextmanager
def running_app(base_url: str, args: dict, timeout_s: float = 120.0) -> Iterator[object]:
    """Deploy `build_app(args)` as the only app at route "/", wait until HTTP answers; yields the
    app's handle and deletes the app afterwards."""
    import httpx
    from ray import serve

    from cluster.app import build_app

    serve.run(build_app(args), name=APP_NAME, route_prefix="/", logging_config=QUIET)
    try:
        deadline = time.monotonic() + timeout_s
        while True:  # the proxy learns the route shortly after the app is running
            try:
                if httpx.get(f"{base_url}/health", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the app did not answer /health within {timeout_s} s")
            time.sleep(0.2)
        yield serve.get_app_handle(APP_NAME)
    finally:
        serve.delete(APP_NAME)


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    """The `data:` payloads of a server-sent event stream: dicts, and the final "[DONE]"."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        yield data if data == "[DONE]" else json.loads(data)


def pixels(image: bytes | str | Image.Image) -> np.ndarray:
    """RGB pixels (uint8 [H, W, 3]) of PNG bytes, base64 PNG text or a PIL image."""
    if isinstance(image, str):
        image = base64.b64decode(image)
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    return np.asarray(image.convert("RGB"))


def max_pixel_diff(a, b) -> int:
    a, b = pixels(a), pixels(b)
    assert a.shape == b.shape, f"image shapes differ: {a.shape} vs {b.shape}"
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
