"""Randomness of a request: a seed, or the exact tensors to use (parity with a reference run).

All random tensors are drawn on the CPU in float32 and in a fixed order (edit: the VAE
posterior noise, then the initial latent noise), so every executor sees the same numbers.
"""
from __future__ import annotations

import secrets

import torch
from torch import Tensor

from bagel_model.errors import InvalidRequest


def random_seed() -> int:
    """A seed for a request that names none; callers report it, so the output can be made again."""
    return secrets.randbelow(2**31)


class NoiseSource:
    def __init__(self, seed: int | None = None, tensors: list[Tensor] | None = None):
        self.generator = torch.Generator("cpu")
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self._tensors = list(tensors or [])

    def randn(self, *shape: int) -> Tensor:
        """The next standard-normal tensor of this shape."""
        if self._tensors:
            t = self._tensors.pop(0)
            if tuple(t.shape) != shape:
                raise InvalidRequest(f"injected noise has shape {list(t.shape)}, expected {list(shape)}")
            return t.float()
        return torch.randn(shape, generator=self.generator, dtype=torch.float32)
