"""Pipeline stages: which contiguous range of LLM layers a stage owns.

Layer indices are always global, so a stage's parameters keep their checkpoint names.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: `layers` is a half-open range of global LLM layer indices."""

    index: int
    num_stages: int
    layers: range

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def __str__(self) -> str:
        return f"stage {self.index}/{self.num_stages} layers [{self.layers.start}, {self.layers.stop})"


def full_model(num_layers: int) -> StageSpec:
    """The single stage holding every layer."""
    return StageSpec(0, 1, range(num_layers))


def split_layers(num_layers: int, num_stages: int, sizes: list[int] | None = None) -> list[StageSpec]:
    """Split `num_layers` into `num_stages` contiguous stages (even split, earlier stages larger,
    unless explicit `sizes` are given)."""
    if num_stages < 1 or num_stages > num_layers:
        raise ValueError(f"num_stages must be in [1, {num_layers}], got {num_stages}")
    if sizes is None:
        base, extra = divmod(num_layers, num_stages)
        sizes = [base + (1 if i < extra else 0) for i in range(num_stages)]
    if len(sizes) != num_stages or sum(sizes) != num_layers or min(sizes) < 1:
        raise ValueError(f"stage sizes {sizes} must be {num_stages} positive numbers summing to {num_layers}")
    stages, start = [], 0
    for i, size in enumerate(sizes):
        stages.append(StageSpec(i, num_stages, range(start, start + size)))
        start += size
    return stages
