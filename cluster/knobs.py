"""The web UI's knobs and per-task defaults, served as JSON (`GET /knobs`) so that the page shows
exactly what the server uses: every sampler knob of pipelines/params.py with its help line and
each task's default, the seed and think budget of image requests, and the chat defaults.

What is the page's own is here: labels, one-line hints and input ranges (the official UI's,
spec §5.9; the server validates, these only guide). A knob without an entry still appears, under
its own name.
"""
from __future__ import annotations

from typing import Literal, get_args, get_origin

from pipelines.params import CHAT_DEFAULTS, EDIT_DEFAULTS, ImageParams, TextParams, image_knobs

TASK_DEFAULTS = {"t2i": ImageParams(), "edit": EDIT_DEFAULTS}

PAGE = {
    "cfg_text_scale": dict(label="Text guidance", min=1, max=8, step=0.1,
                           hint="How closely to follow the prompt. 1 = off."),
    "cfg_img_scale": dict(label="Image guidance", min=1, max=4, step=0.1,
                          hint="How much to keep the input image. 1 = off."),
    "cfg_interval": dict(label="Guidance interval start", min=0, max=1, step=0.05,
                         hint="Guidance for start < t ≤ 1.0 (end fixed)."),
    "timestep_shift": dict(label="Timestep shift", min=1, max=10, step=0.5,
                           hint="Higher: more steps on layout, fewer on detail."),
    "num_timesteps": dict(label="Steps", min=2, max=100, step=1, hint="Denoising steps: more is slower and finer."),
    "cfg_renorm_min": dict(label="Renorm minimum", min=0, max=1, step=0.05,
                           hint="Lower clamp of the renorm factor; 1 = no renorm."),
    "cfg_renorm_type": dict(label="Renorm type", hint="global (text-to-image), text_channel (edit)."),
    "cfg_refresh_interval": dict(label="Guidance refresh (approximate)", min=1, max=10, step=1,
                                 hint="1 = exact. 2–3: faster, slightly different."),
}
SEED = dict(name="seed", label="Seed", min=0, step=1, optional=True, placeholder="random",
            hint="Blank = random; the seed used is shown.",
            help="seed: the noise seed. Blank picks a random one; the seed actually used is shown with the result, "
                 "and the same seed and settings give the same image.")
THINK_TOKENS = dict(name="max_think_tokens", label="Max think tokens", min=64, max=4006, step=1, think=True, hint="Longest thought, in tokens.",
                    help="max_think_tokens: the longest plan BAGEL writes before drawing, in generated tokens.")


def web_knobs() -> dict:
    """{"knobs": inputs in order, "defaults": {task: {input name: value}}, "chat": chat defaults}.

    An input has `name`, `label`, `hint`, `help` and, as fits, `min`/`max`/`step`, `options`, `optional`, `placeholder`, `think` (shown only when thinking) and `param` + `end`
    (a pair knob shown as its start; the request sends [start, end])."""
    inputs, defaults = [], {task: {} for task in TASK_DEFAULTS}
    for knob in image_knobs():
        entry = {"name": knob.name, "label": knob.name, "hint": "", **PAGE.get(knob.name, {}),
                 "help": f"{knob.name}: {knob.help}."}
        values = {task: getattr(params, knob.name) for task, params in TASK_DEFAULTS.items()}
        if get_origin(knob.type) is Literal:
            entry["options"] = list(get_args(knob.type))
        elif get_origin(knob.type) is tuple:  # shown as its start; every task's end is the same
            (end,) = {v[1] for v in values.values()}
            entry.update(name=f"{knob.name}_start", param=knob.name, end=end)
            values = {task: v[0] for task, v in values.items()}
        inputs.append(entry)
        for task, value in values.items():
            defaults[task][entry["name"]] = value
    inputs += [SEED, THINK_TOKENS]
    for task in defaults:
        defaults[task].update(seed="", max_think_tokens=TextParams().max_new_tokens)
    return {"knobs": inputs, "defaults": defaults,
            "chat": {"max_tokens": CHAT_DEFAULTS.max_new_tokens,
                     "temperature": CHAT_DEFAULTS.temperature if CHAT_DEFAULTS.do_sample else 0}}
