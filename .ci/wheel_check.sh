#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it WITHOUT extras (under
# constraints.txt) into a clean venv outside the checkout, then from another folder run
# `bagel --help` and `bagel serve --help` (which must not import torch, Ray or httpx), `bagel
# config`, `bagel generate` on the demo model, and `bagel serve` with one request. About 2-3
# minutes, most of it pip.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
serve_pid=""
cleanup() {
  if [ -n "$serve_pid" ]; then kill -TERM "$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
export BAGEL_DEMO_DIR="$work/demo-cache" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
unset BAGEL_CHECKPOINT PYTHONPATH

python3 -m venv "$work/venv"
py="$work/venv/bin/python" bagel="$work/venv/bin/bagel"
"$py" -m pip install -q --upgrade pip
# This machine carries a local CPU torch wheel (as in the Makefile); elsewhere PyPI's.
"$py" -m pip install -q torch==2.13.0 || "$py" -m pip install -q -c "$repo/constraints.txt" torch
"$py" -m pip wheel -q --no-deps -w "$work/dist" "$repo"
"$py" -m pip install -q -c "$repo/constraints.txt" "$work"/dist/bagel_serve-*.whl

cd "$work"  # not the checkout: only what the wheel installed is importable
echo "wheel check: bagel --help, bagel serve --help"
"$bagel" --help >/dev/null
"$bagel" serve --help > serve_help.txt
grep -q -- "--config" serve_help.txt
"$py" - <<'PY'
import sys
from bagel_serve.cli import main
assert main(["--help"]) == 0 and main(["serve", "--help"]) == 0
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "ray", "httpx"})
assert not heavy, f"bagel --help or bagel serve --help imported {heavy}"
PY
echo "wheel check: bagel config, bagel generate"
"$bagel" config my_config.yaml
grep -q "import_path: cluster.app:build_app" my_config.yaml
"$bagel" generate "a red fox" -o fox.png --height 64 --width 64 --num-timesteps 3 --seed 0
"$py" -c "from PIL import Image; assert Image.open('fox.png').size == (64, 64)"

echo "wheel check: bagel serve, then a request"
port=$("$py" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$bagel" serve --config my_config.yaml --port "$port" > serve.log 2>&1 &
serve_pid=$!
for _ in $(seq 300); do  # it prints "is ready" once /health says so (after warm-up)
  grep -q "is ready on http://127.0.0.1:$port" serve.log && break
  kill -0 "$serve_pid" 2>/dev/null || { cat serve.log; echo "bagel serve exited"; exit 1; }
  sleep 1
done
grep -q "is ready on http://127.0.0.1:$port" serve.log || { cat serve.log; echo "not ready within 300 s"; exit 1; }
"$py" - "$port" <<'PY' || { cat serve.log; exit 1; }
import base64, io, json, sys, urllib.request
from PIL import Image
url = f"http://127.0.0.1:{sys.argv[1]}"
with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
    assert json.load(r)["status"] == "ok"
body = json.dumps({"prompt": "a red fox", "size": "64x64", "num_timesteps": 3, "seed": 1}).encode()
request = urllib.request.Request(f"{url}/v1/images/generations", body, {"content-type": "application/json"})
with urllib.request.urlopen(request, timeout=120) as r:
    image = Image.open(io.BytesIO(base64.b64decode(json.load(r)["data"][0]["b64_json"])))
assert image.size == (64, 64), image.size
print("wheel check: served a 64x64 image")
PY
kill -TERM "$serve_pid"  # `bagel serve` shuts Serve and Ray down on SIGTERM as on Ctrl-C
wait "$serve_pid" || { cat serve.log; echo "bagel serve did not stop cleanly"; exit 1; }
serve_pid=""
echo "wheel check: ok"
