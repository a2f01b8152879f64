"""Stage-to-stage hop time of a hidden-state tensor between two Ray actors through
cluster/transport.py (cuda_ipc on one GPU, nccl on two, gloo on CPU), against Ray's object store.

    python -m bench.transport --out bench/results [--kind cuda_ipc] [--mib 28]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import ray
import torch

from bench.provenance import write_report


@ray.remote(num_cpus=0)
class Peer:
    def __init__(self, rank: int, kind: str, device: str):
        from cluster.transport import Transport

        self.rank, self.kind = rank, kind
        self.device = torch.device(device)
        self.args = (kind, rank, 2, None, self.device)
        self.transport: Transport | None = None

    def address(self) -> str:
        import socket

        with socket.socket() as s:
            s.bind(("", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"

    def init(self, init_method: str | None) -> None:
        from cluster.transport import Transport

        kind, rank, world, _, device = self.args
        self.transport = Transport(kind, rank, world, init_method, device)

    def send(self, numel: int, microbatch: int):
        tensor = torch.randn(numel, device=self.device, dtype=torch.bfloat16)
        return self.transport.send(tensor, microbatch, [1 - self.rank])

    def recv(self, handle) -> float:
        out = self.transport.recv(handle)
        if out.is_cuda:
            torch.cuda.synchronize()
        return float(out.float().sum())

    def make(self, numel: int):
        return torch.randn(numel, device=self.device, dtype=torch.bfloat16)

    def take(self, tensor) -> float:
        if tensor.is_cuda:
            torch.cuda.synchronize()
        return float(tensor.float().sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="cuda_ipc")
    p.add_argument("--mib", type=float, default=28.0)
    p.add_argument("--hops", type=int, default=20)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    gpu = args.kind != "gloo"
    ray.init(address="local", include_dashboard=False, num_gpus=1 if gpu else 0,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", str(Path.cwd()))}})
    device = "cuda" if gpu else "cpu"
    opts = {"num_gpus": 0.5} if gpu else {}
    a, b = Peer.options(**opts).remote(0, args.kind, device), Peer.options(**opts).remote(1, args.kind, device)
    init = ray.get(a.address.remote()) if args.kind in ("gloo", "nccl") else None
    ray.get([a.init.remote(init), b.init.remote(init)])
    numel = int(args.mib * 2**20 / 2)
    results = {}
    for name, hop in (("transport", lambda i: b.recv.remote(a.send.remote(numel, i))),
                      ("object_store", lambda i: b.take.remote(a.make.remote(numel)))):
        times = []
        for i in range(args.hops + 3):
            t = time.perf_counter()
            ray.get(hop(i))
            if i >= 3:
                times.append(time.perf_counter() - t)
        results[name] = {"median_s": statistics.median(times), "min_s": min(times)}
    report = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "torch": torch.__version__,
              "kind": args.kind, "mib": args.mib, "hops": args.hops,
              "note": "each hop includes making the tensor and a Ray call round trip", **results}
    write_report(report, args.out, f"transport_{args.kind}.json")
    print(json.dumps(report))
    ray.shutdown()


if __name__ == "__main__":
    main()
