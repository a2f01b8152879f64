"""The names of the LLM's weight formats (`bagel_model/quantize.py` implements them), in a module
without torch: the command line's parser lists them, and `bagel --help` imports no torch."""
from __future__ import annotations

MODES = ("df11", "fp8", "int8", "nf4")
APPROXIMATE = frozenset({"fp8", "int8", "nf4"})


def is_approximate(mode: str | None) -> bool:
    return mode in APPROXIMATE
