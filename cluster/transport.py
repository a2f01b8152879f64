"""Tensors between the stage workers of one replica, device to device.

A replica's workers form one world, rank = branch_group * num_stages + stage. `send(tensor, tag,
dsts)` returns a small picklable `Handle` that travels with a Ray call to each receiver;
`recv(handle)` there yields the tensor. The bytes never enter Ray's object store:
- `gloo` (CPU) and `nccl` (one GPU per worker): torch.distributed point-to-point;
- `cuda_ipc` (workers sharing one GPU, where NCCL refuses to run): a CUDA IPC handle of the
  sender's tensor, which the sender keeps alive until the orchestrator releases its tag;
- `auto` on GPUs: per pair, CUDA IPC between workers on the same GPU, NCCL otherwise.
Point-to-point transfers between two ranks match in the order they are made, so the caller
makes every transfer's send and receive within one ordered submission (stage_group.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.multiprocessing.reductions import reduce_tensor

KINDS = ("gloo", "nccl", "cuda_ipc", "auto")


@dataclass(frozen=True)
class Handle:
    """What travels through Ray: who sent what shape/dtype under which tag, plus the IPC
    descriptor for receivers on the sender's GPU."""

    tag: int
    src: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    ipc: Any = None


class Transport:
    """One worker's end of the replica's links. `gpus`: each rank's GPU (uuid), None on CPU."""

    def __init__(self, kind: str, rank: int, world_size: int, init_method: str | None, device: torch.device,
                 gpus: list[str] | None = None, timeout_s: float = 120.0):
        if kind not in KINDS:
            raise ValueError(f"transport must be one of {KINDS}, got {kind!r}")
        self.kind, self.rank, self.world_size, self.device = kind, rank, world_size, device
        gpus = gpus or [None] * world_size
        # Per peer: True where tensors go by CUDA IPC.
        self._ipc = [kind == "cuda_ipc" or (kind == "auto" and g is not None and g == gpus[rank]) for g in gpus]
        self._pending: list[tuple[Any, Tensor]] = []  # in-flight isends with their tensors
        self._kept: dict[int, Tensor] = {}  # cuda_ipc: tensors receivers may still read, by tag
        if self.needs_process_group(kind, gpus):
            backend = "gloo" if kind == "gloo" else "nccl"
            if backend == "nccl":
                torch.cuda.set_device(device)
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s))

    @staticmethod
    def needs_process_group(kind: str, gpus: list[str | None]) -> bool:
        """Whether some pair of these workers talks through torch.distributed."""
        if len(gpus) < 2 or kind == "cuda_ipc":
            return False
        return kind != "auto" or len(set(gpus)) > 1

    def send(self, tensor: Tensor, tag: int, dsts: list[int]) -> Handle:
        """Send to every rank in `dsts` (each receives the same handle)."""
        tensor = tensor.contiguous()
        ipc = None
        if any(self._ipc[d] for d in dsts):
            torch.cuda.current_stream(tensor.device).synchronize()
            self._kept[tag] = tensor
            ipc = reduce_tensor(tensor)
        others = [d for d in dsts if not self._ipc[d]]
        if others:
            # Never wait here for earlier sends: their receivers may be waiting for this call.
            self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
            self._pending += [(dist.isend(tensor, d), tensor) for d in others]
        return Handle(tag, self.rank, tuple(tensor.shape), tensor.dtype, ipc)

    def recv(self, handle: Handle) -> Tensor:
        if self._ipc[handle.src]:
            rebuild, args = handle.ipc
            return rebuild(*args).clone()
        buf = torch.empty(handle.shape, dtype=handle.dtype, device=self.device)
        dist.recv(buf, handle.src)
        return buf

    def release(self, tags: list[int]) -> None:
        """The receivers have consumed these transfers: drop what was kept for them."""
        for tag in tags:
            self._kept.pop(tag, None)
