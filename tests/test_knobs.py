"""The sampler knobs have one definition (pipelines/params.py): the CLI's flags, the HTTP API's
fields and the web UI's inputs are made from it, with the same names, help and per-task defaults.
(tests/test_webui.py checks that the page in a browser shows what GET /knobs serves.)"""
from __future__ import annotations

from bagel_serve.cli import build_parser
from cluster.args import Limits
from cluster.knobs import web_knobs
from cluster.protocol import ChatCompletionRequest, ImageGenerationRequest, ImageKnobs
from pipelines.params import CHAT_DEFAULTS, EDIT_DEFAULTS, RENORM_TYPES, ImageParams, TextParams, image_knobs

NAMES = [k.name for k in image_knobs()]


def test_every_sampler_field_but_the_size_is_a_knob():
    sizes = {"height", "width"}
    assert NAMES == [f for f in ImageParams.__dataclass_fields__ if f not in sizes]
    assert all(k.help for k in image_knobs())


def subcommand(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]


def test_cli_flags_are_the_knobs_with_each_task_default():
    for command, base in (("generate", ImageParams()), ("edit", EDIT_DEFAULTS)):
        actions = {a.dest: a for a in subcommand(command)._actions}
        for knob in image_knobs():
            action = actions[knob.name]
            assert action.option_strings == [f"--{knob.name.replace('_', '-')}"]
            assert knob.help in action.help
            default = getattr(base, knob.name)
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else str(default)
            assert action.help.endswith(f"(default: {shown})"), (command, action.help)
        assert actions["cfg_renorm_type"].choices == RENORM_TYPES
        assert actions["cfg_interval"].nargs == 2
    args = build_parser().parse_args(["generate", "x", "-o", "x.png", "--cfg-interval", "0.1", "0.9",
                                      "--num-timesteps", "7"])
    assert (args.cfg_interval, args.num_timesteps, args.cfg_text_scale) == ([0.1, 0.9], 7, None)


def test_http_fields_are_the_knobs_and_unset_ones_take_the_task_defaults():
    fields = ImageKnobs.model_fields
    assert [n for n in fields if n in NAMES] == NAMES
    assert all(fields[k.name].description == k.help and fields[k.name].default is None for k in image_knobs())
    task, _ = ImageGenerationRequest(prompt="x").to_task(Limits())
    assert task.params == ImageParams() and task.text_params == TextParams()
    task, _ = ImageGenerationRequest(prompt="x", cfg_interval=(0.1, 0.9), max_think_tokens=5).to_task(Limits())
    assert task.params.cfg_interval == (0.1, 0.9) and task.text_params.max_new_tokens == 5
    chat, _ = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]).to_task(Limits())
    assert chat.params == CHAT_DEFAULTS
    chat, _ = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.7).to_task(Limits())
    assert chat.params.do_sample and chat.params.temperature == 0.7


def test_web_knobs_are_the_knobs_with_each_task_default():
    page = web_knobs()
    inputs = {k["name"]: k for k in page["knobs"]}
    assert [k.get("param", k["name"]) for k in page["knobs"]] == NAMES + ["seed", "max_think_tokens"]
    assert inputs["cfg_interval_start"]["end"] == 1.0
    assert inputs["cfg_renorm_type"]["options"] == list(RENORM_TYPES)
    for knob in image_knobs():
        entry = next(k for k in page["knobs"] if k.get("param", k["name"]) == knob.name)
        assert knob.help in entry["help"] and entry["label"] and entry["hint"]
    for task, params in (("t2i", ImageParams()), ("edit", EDIT_DEFAULTS)):
        defaults = dict(page["defaults"][task])
        assert defaults.pop("cfg_interval_start") == params.cfg_interval[0]
        assert defaults.pop("max_think_tokens") == TextParams().max_new_tokens
        assert defaults.pop("seed") == ""
        assert defaults == {n: getattr(params, n) for n in NAMES if n != "cfg_interval"}
    assert page["chat"] == {"max_tokens": CHAT_DEFAULTS.max_new_tokens, "temperature": 0}
