"""Device and dtype names from configuration: where each component runs ("auto" dtypes follow
bagel_model/devices.py)."""
from __future__ import annotations

import torch

from bagel_model.devices import default_dtype

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def placed_device(device: str, gpu_share: float) -> str:
    """The device of a component with this GPU share: 'auto' -> 'cuda' with a share, else 'cpu'."""
    if device != "auto":
        return device
    return "cuda" if gpu_share > 0 else "cpu"


def resolve_device(device: str) -> torch.device:
    """In the component's process, for a device `placed_device` gave: 'cuda' -> the GPU Ray gave it."""
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> the default dtype of `device` ('cpu' or 'cuda', as `placed_device` gives;
    decided without touching CUDA, so any process may ask)."""
    return default_dtype(device) if dtype == "auto" else DTYPES[dtype]
