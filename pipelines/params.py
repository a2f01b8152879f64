"""Inference parameters, with the official BAGEL names and per-task defaults: the one home of
both. The CLI's flags, the HTTP API's fields and the web UI's inputs are made from `image_knobs()`.

Defaults follow the official notebook (text-to-image: cfg_img_scale 1.0; editing: cfg_img_scale
2.0, cfg_interval [0, 1], text_channel renorm). `validate()` raises one `InvalidRequest` naming
every field out of range, before any model work. A new knob is one field with a help line (and
its validation).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from numbers import Integral, Real
from typing import Any, Literal, get_args, get_type_hints

from bagel_model.errors import InvalidRequest

RenormType = Literal["global", "channel", "text_channel"]
RENORM_TYPES: tuple[str, ...] = get_args(RenormType)


def _knob(default, help: str, metavar: str | tuple[str, ...] | None = None):
    """A field every caller exposes (CLI flag, HTTP field, web UI input), with its help line."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True)
class ImageParams:
    """Flow-matching sampler and classifier-free guidance settings."""

    cfg_text_scale: float = _knob(4.0, "text guidance: how closely the image follows the prompt; 1 turns all "
                                       "guidance off (image guidance too)", "S")
    cfg_img_scale: float = _knob(1.0, "image guidance: how much of the input images the output keeps; 1 = off", "S")
    cfg_interval: tuple[float, float] = _knob(
        (0.4, 1.0), "guidance runs only while the timestep t (1 = noise, 0 = image) is in (START, END]",
        ("START", "END"))
    timestep_shift: float = _knob(3.0, "shifts the schedule toward the noisy end: higher spends more steps on "
                                       "layout, lower on detail")
    num_timesteps: int = _knob(50, "points of the denoising schedule (model evaluations + 1): more is slower "
                                   "and finer")
    cfg_renorm_min: float = _knob(0.0, "lower clamp of the guided velocity's renorm factor; 0 = full renorm, "
                                       "1 = none")
    cfg_renorm_type: RenormType = _knob(
        "global", "renormalise the guided velocity over the whole image (global), per token (channel), or the "
                  "text-guided part per token before image guidance (text_channel)")
    cfg_refresh_interval: int = _knob(1, "APPROXIMATE when K > 1, and faster: the guidance branches (text-free, "
                                         "image-free) run every K-th guided step only; in between each is v_cond "
                                         "minus its last measured difference to it. 1 is exact", "K")
    height: int | None = None  # output size; None: the model's largest (1024 for BAGEL-7B-MoT)
    width: int | None = None  # must stay None when an input image fixes the output size

    def validate(self, max_side: int, stride: int) -> ImageParams:
        """Raises one `InvalidRequest` naming every field out of range."""
        interval = self.cfg_interval
        checks = [
            (_number(self.cfg_text_scale) and 1.0 <= self.cfg_text_scale <= 100.0,
             "cfg_text_scale", "must be in [1, 100]"),
            (_number(self.cfg_img_scale) and 1.0 <= self.cfg_img_scale <= 100.0,
             "cfg_img_scale", "must be in [1, 100]"),
            (isinstance(interval, (tuple, list)) and len(interval) == 2 and all(_number(v) for v in interval)
             and 0.0 <= interval[0] <= interval[1] <= 1.0,
             "cfg_interval", "must be [start, end] with 0 <= start <= end <= 1"),
            (_number(self.timestep_shift) and 0.0 < self.timestep_shift <= 100.0,
             "timestep_shift", "must be in (0, 100]"),
            (_integer(self.num_timesteps) and 2 <= self.num_timesteps <= 1000,
             "num_timesteps", "must be an integer in [2, 1000]"),
            (_number(self.cfg_renorm_min) and 0.0 <= self.cfg_renorm_min <= 1.0,
             "cfg_renorm_min", "must be in [0, 1]"),
            (_integer(self.cfg_refresh_interval) and 1 <= self.cfg_refresh_interval <= 10,
             "cfg_refresh_interval", "must be an integer in [1, 10]"),
            (self.cfg_renorm_type in RENORM_TYPES, "cfg_renorm_type", f"must be one of {list(RENORM_TYPES)}"),
        ]
        for name in ("height", "width"):
            value = getattr(self, name)
            checks.append((value is None or (_integer(value) and stride <= value <= max_side and value % stride == 0),
                           name, f"must be an integer multiple of {stride} in [{stride}, {max_side}], got {value}"))
        _report(checks)
        return self


EDIT_DEFAULTS = ImageParams(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")


@dataclass(frozen=True)
class Knob:
    """One parameter as callers expose it."""

    name: str
    type: Any  # the field's type: float, int, a Literal of choices or a tuple
    help: str
    metavar: str | tuple[str, ...] | None


def image_knobs() -> list[Knob]:
    """The sampler knobs, in field order: the `ImageParams` fields with a help line (the output
    size is not one: each caller sets it its own way)."""
    hints = get_type_hints(ImageParams)
    return [Knob(f.name, hints[f.name], f.metadata["help"], f.metadata["metavar"])
            for f in fields(ImageParams) if "help" in f.metadata]


@dataclass(frozen=True)
class TextParams:
    """Text decoding: greedy by default, else temperature sampling, optionally from the
    smallest set of tokens whose probability reaches `top_p` (the official decoder has no
    top-p: 1.0). Generation also ends where the text first contains one of `stop` (the
    stop string is not part of the result).

    `max_new_tokens` counts generated tokens. Its default, 999, is the official notebook's
    `max_think_token_n` = 1000 (also its understanding default), which counts the leading
    <|im_start|> too."""

    max_new_tokens: int = 999
    do_sample: bool = False
    temperature: float = 0.3
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    def validate(self, limit: int = 32768) -> TextParams:
        """Raises one `InvalidRequest` naming every field out of range."""
        _report([
            (_integer(self.max_new_tokens) and 1 <= self.max_new_tokens <= limit, "max_new_tokens",
             f"must be an integer in [1, {limit}]"),
            (_number(self.temperature) and 0.0 <= self.temperature <= 10.0, "temperature", "must be in [0, 10]"),
            (_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (isinstance(self.stop, (tuple, list)) and all(isinstance(s, str) and s for s in self.stop),
             "stop", "must be non-empty strings"),
        ])
        return self


# Chat (the HTTP API and web UI): the official app's understanding default of 512 new tokens.
CHAT_DEFAULTS = TextParams(max_new_tokens=512)


def with_overrides(params, overrides: dict):
    """`params` with the given fields replaced; unknown names raise InvalidRequest."""
    names = {f.name for f in fields(params)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InvalidRequest(f"unknown parameters {unknown}")
    if "cfg_interval" in overrides:
        overrides = {**overrides, "cfg_interval": tuple(overrides["cfg_interval"])}
    return replace(params, **overrides)


def _number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _report(checks: list[tuple[bool, str, str]]) -> None:
    """Raise one InvalidRequest for every failed (ok, field, message) check."""
    bad = [(field, message) for ok, field, message in checks if not ok]
    if bad:
        raise InvalidRequest("; ".join(f"{field} {message}" for field, message in bad),
                             param=",".join(field for field, _ in bad))
