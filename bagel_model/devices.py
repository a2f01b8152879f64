"""Where the model runs when nobody says: one rule for the CLI, the service and the benchmarks."""
from __future__ import annotations

import torch


def default_device() -> torch.device:
    """A GPU if this process sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on GPUs (the checkpoint's dtype), float32 on CPUs."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
