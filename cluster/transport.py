"""Hidden states between pipeline stages, device to device.

`send(tensor)` returns a small picklable handle that travels with the Ray call to the next
stage; `recv(handle)` there yields the tensor. The bytes never enter Ray's object store:
- `gloo` (CPU) and `nccl` (one GPU per stage): torch.distributed point-to-point, rank = stage;
- `cuda_ipc` (stages sharing one GPU, where NCCL refuses to run): a CUDA IPC handle of the
  sender's tensor, which the sender keeps alive until the orchestrator says the micro-batch is done.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.multiprocessing.reductions import reduce_tensor

KINDS = ("gloo", "nccl", "cuda_ipc")


@dataclass(frozen=True)
class Handle:
    """What travels through Ray: shape/dtype, plus the IPC descriptor for `cuda_ipc`."""

    microbatch: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    ipc: Any = None


class Transport:
    """One stage's end of the stage-to-stage link."""

    def __init__(self, kind: str, rank: int, world_size: int, init_method: str | None, device: torch.device,
                 timeout_s: float = 120.0):
        if kind not in KINDS:
            raise ValueError(f"transport must be one of {KINDS}, got {kind!r}")
        self.kind, self.rank, self.device = kind, rank, device
        self._pending: list[tuple[Any, Tensor]] = []  # in-flight isends with their tensors
        self._kept: dict[int, Tensor] = {}  # cuda_ipc: tensors the receiver may still read
        if kind in ("gloo", "nccl") and world_size > 1:
            if kind == "nccl":
                torch.cuda.set_device(device)
            dist.init_process_group(kind, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s))

    def send(self, tensor: Tensor, microbatch: int) -> Handle:
        tensor = tensor.contiguous()
        if self.kind == "cuda_ipc":
            torch.cuda.current_stream(tensor.device).synchronize()
            self._kept[microbatch] = tensor
            return Handle(microbatch, tuple(tensor.shape), tensor.dtype, reduce_tensor(tensor))
        self._drain()
        self._pending.append((dist.isend(tensor, self.rank + 1), tensor))
        return Handle(microbatch, tuple(tensor.shape), tensor.dtype)

    def recv(self, handle: Handle) -> Tensor:
        if self.kind == "cuda_ipc":
            rebuild, args = handle.ipc
            return rebuild(*args).clone()
        buf = torch.empty(handle.shape, dtype=handle.dtype, device=self.device)
        dist.recv(buf, self.rank - 1)
        return buf

    def release(self, microbatches: list[int]) -> None:
        """The receiver has consumed these micro-batches: drop what was kept for them."""
        for m in microbatches:
            self._kept.pop(m, None)

    def _drain(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
