"""The one request-normalization layer: every route's body (JSON, or a multipart form turned
into a dict) passes through `parse` before pydantic validates it against the route's model.

What clients of other BAGEL servers and of OpenAI send becomes our fields:
- nested `extra_body` / `extra_params` objects are unwrapped (raw-JSON clients of vLLM-Omni put
  the knobs there; the OpenAI SDK's `extra_body=` already merges them into the body);
- the peers' names map onto ours (`ALIASES`; `width` + `height` -> `size`; M*'s `think_mode`,
  SGLang's `chat_template_kwargs.enable_thinking` and OpenAI's `reasoning_effort` -> `think`);
- OpenAI fields that do not change what BAGEL does are dropped (`IGNORED`, each with its
  reason), and fields we cannot honour are accepted only with their "off" value
  (`ONLY_OFF`: anything else is a 400 that says why);
- any other name that is no field of the route's model is unknown.
Every problem of a request is reported in ONE 400 (`InvalidRequest`): unknown names with the
closest known name, conflicting duplicates, unsupported values, then pydantic's type and range
errors; its `param` names every field involved, comma-separated. The README's compatibility
table describes these tables.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from bagel_model.errors import InvalidRequest

Model = TypeVar("Model", bound=BaseModel)

WRAPPERS = ("extra_body", "extra_params")

# alias -> our field, on every route whose model has that field.
ALIASES = {
    "num_inference_steps": "num_timesteps",  # vLLM-Omni, SGLang: schedule points, as ours (n-1 evaluations)
    "flow_shift": "timestep_shift",  # SGLang's BAGEL sampling parameters
    "guidance_scale": "cfg_text_scale",  # SGLang's BAGEL: the text guidance scale
    "true_cfg_scale": "cfg_img_scale",  # SGLang's BAGEL: the image guidance scale (edits)
    "think_mode": "think",  # M*
    "enable_thinking": "think",  # SGLang
    "max_think_token_n": "max_think_tokens",  # the official inferencer
    "num_outputs_per_prompt": "n",  # vLLM-Omni
}
# Per route: the text knobs mean the thought on the images routes, the answer on chat.
ROUTE_ALIASES = {
    "images": {"think_do_sample": "do_sample", "think_temperature": "text_temperature",
               "max_output_tokens": "max_think_tokens", "max_tokens": "max_think_tokens"},  # M*
    "chat": {"max_new_tokens": "max_completion_tokens", "max_output_tokens": "max_completion_tokens",
             "text_temperature": "temperature", "think_temperature": "temperature",
             "think_do_sample": "do_sample"},
}


@dataclass(frozen=True)
class OnlyOff:
    """A field accepted only with one of `off` (its value when unset); `why` we cannot honour more."""

    off: tuple
    why: str


IGNORE_USER = "an end-user id for abuse monitoring; there is none here"
IMAGE_IGNORED = {
    "user": IGNORE_USER,
    "safety_identifier": IGNORE_USER,
    "moderation": "there is no content moderation here ('auto' and 'low' alike)",
    "complexity": "planning effort of OpenAI's image models; BAGEL plans in think mode (think)",
    "style": "DALL-E 3's vivid/natural style; BAGEL has no style switch",
    "input_fidelity": "BAGEL always sees the whole input image (VAE latents and ViT features)",
    "generator_device": "SGLang's noise device; noise is drawn on the CPU as in the official code, "
                        "so a seed gives the same image on any device",
}
IMAGE_ONLY_OFF = {
    "background": OnlyOff((None, "auto", "opaque"), "BAGEL draws opaque RGB images; transparency is not possible"),
    "frame_count": OnlyOff((None,), "BAGEL draws still images (no GIF output)"),
    "frame_duration_ms": OnlyOff((None,), "BAGEL draws still images (no GIF output)"),
    "svg": OnlyOff((None,), "BAGEL draws raster images (no SVG output)"),
    "enable_taylorseer": OnlyOff((None, False), "TaylorSeer feature caching (an approximation) is not implemented"),
    "image_preprocess": OnlyOff((None, "default"), "input images are resized as the official BAGEL code does"),
}
IGNORED = {
    "images": IMAGE_IGNORED,
    "edits": IMAGE_IGNORED,
    "chat": {
        "user": IGNORE_USER,
        "safety_identifier": IGNORE_USER,
        "metadata": "stored-completion tags; completions are not stored here",
        "service_tier": "there is one processing tier here",
        "prompt_cache_key": "a routing hint for OpenAI's prompt cache",
        "prompt_cache_retention": "a setting of OpenAI's prompt cache",
        "prompt_cache_options": "a setting of OpenAI's prompt cache",
        "moderation": IMAGE_IGNORED["moderation"],
        "verbosity": "a hint for OpenAI's reasoning models; BAGEL answers as it does",
        "parallel_tool_calls": "there are no tools here",
        "generator_device": IMAGE_IGNORED["generator_device"],
    },
}
ONLY_OFF = {
    "images": IMAGE_ONLY_OFF,
    "edits": {**IMAGE_ONLY_OFF,
              "mask": OnlyOff((None,), "BAGEL edits follow the instruction over the whole image; "
                                       "inpainting masks are not supported"),
              "markup": OnlyOff((None,), "BAGEL edits follow the instruction over the whole image; "
                                         "markup overlays are not supported")},
    "chat": {
        "logprobs": OnlyOff((None, False), "token log-probabilities are not returned"),
        "top_logprobs": OnlyOff((None, 0), "token log-probabilities are not returned"),
        "frequency_penalty": OnlyOff((None, 0), "BAGEL's decoder has no repetition penalties"),
        "presence_penalty": OnlyOff((None, 0), "BAGEL's decoder has no repetition penalties"),
        "repetition_penalty": OnlyOff((None, 1), "BAGEL's decoder has no repetition penalties"),
        "top_k": OnlyOff((None, 0, -1), "BAGEL's sampler has no top-k (top_p is supported)"),
        "logit_bias": OnlyOff((None, {}), "logit biases are not supported"),
        "tools": OnlyOff((None, []), "BAGEL has no tool calling"),
        "functions": OnlyOff((None, []), "BAGEL has no tool calling"),
        "tool_choice": OnlyOff((None, "none", "auto"), "BAGEL has no tool calling"),
        "function_call": OnlyOff((None, "none", "auto"), "BAGEL has no tool calling"),
        "response_format": OnlyOff((None, {"type": "text"}), "structured (JSON) output is not supported"),
        "audio": OnlyOff((None,), "BAGEL has no audio output"),
        "prediction": OnlyOff((None,), "predicted outputs are not supported"),
        "web_search_options": OnlyOff((None,), "there is no web search here"),
        "store": OnlyOff((None, False), "completions are not stored here"),
        "enable_taylorseer": IMAGE_ONLY_OFF["enable_taylorseer"],
        "image_preprocess": IMAGE_ONLY_OFF["image_preprocess"],
    },
}
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
MAX_SHOWN, MAX_NAME = 20, 60  # problems listed in one error, characters of a field name


def parse(body: object, model: type[Model]) -> Model:
    """The request `body` normalized and validated as `model` (whose `api` is "images",
    "edits" or "chat"); raises one InvalidRequest naming every problem."""
    fields, problems = normalize(body, model)
    try:
        request = model.model_validate(fields)
    except ValidationError as e:
        problems += validation_problems(e.errors())
    if problems:
        raise problems_error(problems)
    return request


def normalize(body: object, model: type[BaseModel]) -> tuple[dict, list[tuple[str, str]]]:
    """(fields for `model`, problems as (field, message)); fields with problems are left out."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    api = model.api
    problems: list[tuple[str, str]] = []
    fields = _unwrap(dict(body), problems)
    known = set(model.model_fields)
    aliases = {**ALIASES, **ROUTE_ALIASES.get("chat" if api == "chat" else "images", {})}
    for alias, target in aliases.items():
        if alias in fields and target in known:
            _set(fields, target, fields.pop(alias), alias, problems)
    _size(fields, problems)
    if api == "chat":
        _think_switches(fields, problems)
    for name in list(fields):
        if name in known:
            continue
        if name in IGNORED[api]:
            del fields[name]
        elif name in ONLY_OFF[api]:
            rule, value = ONLY_OFF[api][name], fields.pop(name)
            if not any(_same(value, off) for off in rule.off):
                allowed = "".join(f" or {json.dumps(o)}" for o in rule.off if o is not None)
                problems.append((name, f"{_show(value)} is not supported: {rule.why} (leave it unset{allowed})"))
        else:
            del fields[name]
            close = difflib.get_close_matches(name[:MAX_NAME], [*known, *aliases, *IGNORED[api], *ONLY_OFF[api]], n=1)
            problems.append((name, "unknown field" + (f" (did you mean '{close[0]}'?)" if close else "")))
    return fields, problems


def validation_problems(errors: list[dict]) -> list[tuple[str, str]]:
    """pydantic errors as (field path, message)."""
    return [(".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body", e.get("msg", "invalid"))
            for e in errors]


def problems_error(problems: list[tuple[str, str]]) -> InvalidRequest:
    """One error naming every (field, message), the first MAX_SHOWN of a hostile flood; `param`
    lists the fields."""
    shown = [(field[:MAX_NAME], message) for field, message in problems[:MAX_SHOWN]]
    more = f"; and {len(problems) - MAX_SHOWN} more problems" if len(problems) > MAX_SHOWN else ""
    fields = list(dict.fromkeys(field for field, _ in shown))
    return InvalidRequest("; ".join(f"{field}: {message}" for field, message in shown) + more, param=",".join(fields))


def _unwrap(fields: dict, problems: list) -> dict:
    """Merge nested extra_body / extra_params objects (a multipart form sends them as JSON text)."""
    for _ in range(4):  # wrappers inside wrappers, a few levels at most
        wrappers = [w for w in WRAPPERS if w in fields]
        if not wrappers:
            break
        for wrapper in wrappers:
            inner = fields.pop(wrapper)
            if isinstance(inner, str):
                try:
                    inner = from_json(inner)  # nesting-limited, unlike json.loads (RecursionError)
                except ValueError:
                    pass
            if not isinstance(inner, dict):
                problems.append((wrapper, "must be an object"))
                continue
            for key, value in inner.items():
                _set(fields, key, value, f"{wrapper}.{key}", problems)
    return fields


def _set(fields: dict, name: str, value: Any, source: str, problems: list) -> None:
    """fields[name] = value, unless it is there already with another value (a conflict)."""
    if name in fields and not _same(fields[name], value):
        problems.append((name, f"given twice with different values: {name}={_show(fields[name])} and "
                               f"{source}={_show(value)}; send one"))
    else:
        fields[name] = value


def _size(fields: dict, problems: list) -> None:
    """width + height (vLLM-Omni, M*, SGLang) -> size "WxH"."""
    if "width" not in fields and "height" not in fields:
        return
    width, height = fields.pop("width", None), fields.pop("height", None)
    if width is None or height is None:
        problems.append(("width" if width is None else "height",
                         "width and height go together (or give size 'WIDTHxHEIGHT')"))
        return
    w, h = _int(width), _int(height)
    if w is None or h is None:
        problems.append(("width" if w is None else "height", "must be an integer"))
        return
    _set(fields, "size", f"{w}x{h}", "width/height", problems)


def _think_switches(fields: dict, problems: list) -> None:
    """SGLang's chat_template_kwargs.enable_thinking / .thinking and OpenAI's reasoning_effort
    switch think mode on chat."""
    kwargs = fields.pop("chat_template_kwargs", None)
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            problems.append(("chat_template_kwargs", "must be an object"))
        else:
            for key, value in kwargs.items():
                if key in ("enable_thinking", "thinking"):
                    _set(fields, "think", value, f"chat_template_kwargs.{key}", problems)
                else:
                    problems.append((f"chat_template_kwargs.{key}", "BAGEL has no chat template; only "
                                     "enable_thinking (or thinking) is understood"))
    effort = fields.pop("reasoning_effort", None)
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            problems.append(("reasoning_effort", f"must be one of {list(REASONING_EFFORTS)}"))
        else:
            _set(fields, "think", effort != "none", "reasoning_effort", problems)


def _same(a: Any, b: Any) -> bool:
    return a == b or str(a).lower() == str(b).lower()  # a form sends "4", JSON 4


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _show(value: Any) -> str:
    return json.dumps(value, default=str)[:60]
