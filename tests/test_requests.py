"""The request-normalization layer and the request models, without Ray: every field of the
current OpenAI SDK's request types is honoured, ignored or refused with a reason; the peers'
aliases land on our fields; every problem of a request comes back in one 400 whose `param`
names the fields. The HTTP checks use the real app with a stub service."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from openai.types import image_edit_params, image_generate_params
from openai.types.chat import completion_create_params

from bagel_model.errors import InvalidRequest
from cluster.api import ImageTask, TextTask
from cluster.args import AppArgs, Limits
from cluster.errors import Overloaded
from cluster.http import create_app
from cluster.normalize import ALIASES, IGNORED, ONLY_OFF, ROUTE_ALIASES, parse
from cluster.protocol import ChatCompletionRequest, ImageEditRequest, ImageGenerationRequest

LIMITS = Limits()
SPECIAL = {"chat": {"reasoning_effort", "stream"}, "images": {"stream"}, "edits": {"stream"}}


@pytest.mark.parametrize("params,model", [
    (image_generate_params.ImageGenerateParamsBase, ImageGenerationRequest),
    (image_edit_params.ImageEditParamsBase, ImageEditRequest),
    (completion_create_params.CompletionCreateParamsBase, ChatCompletionRequest),
], ids=["images.generate", "images.edit", "chat.completions.create"])
def test_every_openai_request_field_is_known(params, model):
    """A field the SDK sends is a field of our model (honoured), ignored or only-off (each with
    its reason in normalize.py); a new SDK field fails this test until it is decided."""
    known = set(model.model_fields) | set(IGNORED[model.api]) | set(ONLY_OFF[model.api]) | SPECIAL[model.api]
    assert set(params.__annotations__) - known == set()


def problems(body: dict, model) -> tuple[str, str]:
    with pytest.raises(InvalidRequest) as info:
        parse(body, model)
    return str(info.value), info.value.param


# -- the peers' request shapes -------------------------------------------------------------------

def test_vllm_omni_chat_text_to_image():
    """examples/online_serving/bagel (vLLM-Omni): knobs at the top level of a chat request."""
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "<|im_start|>A cat<|im_end|>"}]}],
            "modalities": ["image"], "height": 512, "width": 768, "num_inference_steps": 25, "seed": 42,
            "negative_prompt": "blurry"}
    request = parse(body, ChatCompletionRequest)
    task, n = request.to_task(LIMITS)
    assert isinstance(task, ImageTask) and n == 1
    assert (task.params.width, task.params.height, task.params.num_timesteps) == (768, 512, 25)
    assert (task.seed, task.negative_prompt, task.items) == (42, "blurry", ["<|im_start|>A cat<|im_end|>"])
    assert task.params.cfg_img_scale == 1.0  # text-to-image defaults


def test_vllm_omni_raw_json_extra_body():
    """vLLM-Omni's diffusion chat API doc: raw JSON clients nest the knobs in "extra_body"."""
    body = {"messages": [{"role": "user", "content": "A landscape"}], "modalities": ["image"],
            "extra_body": {"num_inference_steps": 30, "seed": 7, "cfg_text_scale": 5.0, "true_cfg_scale": 1.5}}
    task, _ = parse(body, ChatCompletionRequest).to_task(LIMITS)
    assert (task.params.num_timesteps, task.seed, task.params.cfg_text_scale, task.params.cfg_img_scale) == \
        (30, 7, 5.0, 1.5)


def test_mstar_images_generations():
    """M*: images.generate with extra_body {cfg_*, think_mode, width, height}."""
    body = {"model": "bagel", "prompt": "a cat in a hat", "n": 1, "size": "1024x1024", "response_format": "b64_json",
            "cfg_text_scale": 4.0, "cfg_img_scale": 1.0, "cfg_interval": [0.4, 1.0], "cfg_renorm_type": "global",
            "cfg_renorm_min": 0.0, "think_mode": True, "width": 1024, "height": 1024, "image_preprocess": "default",
            "max_output_tokens": 128}
    task, _ = parse(body, ImageGenerationRequest).to_task(LIMITS)
    assert task.think and task.text_params.max_new_tokens == 128
    assert (task.params.width, task.params.height, task.params.cfg_interval) == (1024, 1024, (0.4, 1.0))


def test_sglang_bagel_sampling_names():
    """SGLang's BAGEL sampling params: guidance_scale (text CFG), true_cfg_scale (image CFG),
    flow_shift, num_inference_steps, think_do_sample / think_temperature."""
    body = {"prompt": "x", "image": "aGk=", "guidance_scale": 5.0, "true_cfg_scale": 1.7, "flow_shift": 2.0,
            "num_inference_steps": 12, "negative_prompt": "", "enable_taylorseer": False, "think_do_sample": True,
            "think_temperature": 0.5, "max_think_tokens": 20, "generator_device": "cuda"}
    request = parse(body, ImageEditRequest)
    assert (request.cfg_text_scale, request.cfg_img_scale, request.timestep_shift, request.num_timesteps) == \
        (5.0, 1.7, 2.0, 12)
    assert (request.do_sample, request.text_temperature, request.max_think_tokens) == (True, 0.5, 20)


def test_sglang_chat_thinking_switches():
    for extra in ({"chat_template_kwargs": {"enable_thinking": True}}, {"reasoning_effort": "low"},
                  {"enable_thinking": True}, {"think_mode": True}):
        body = {"messages": [{"role": "user", "content": "why?"}], **extra}
        task, _ = parse(body, ChatCompletionRequest).to_task(LIMITS)
        assert isinstance(task, TextTask) and task.think, extra
    body = {"messages": [{"role": "user", "content": "why?"}], "reasoning_effort": "none"}
    assert not parse(body, ChatCompletionRequest).think


def test_openai_chat_fields_with_their_default_values_are_accepted():
    body = {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                         {"role": "user", "content": "hi", "name": "ann"}],
            "model": "gpt-4o", "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False, "top_logprobs": 0,
            "logit_bias": {}, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "store": False,
            "user": "u", "metadata": {"a": "b"}, "service_tier": "auto", "verbosity": "low", "seed": 1,
            "parallel_tool_calls": True, "stream": True, "stream_options": {"include_usage": True},
            "top_p": 0.9, "temperature": 0.7, "stop": ["\n\n"], "max_completion_tokens": 33, "n": 2,
            "safety_identifier": "s", "prompt_cache_key": "k", "modalities": ["text"]}
    request = parse(body, ChatCompletionRequest)
    task, n = request.to_task(LIMITS)
    assert n == 2 and request.include_usage and request.stream
    assert task.params == type(task.params)(max_new_tokens=33, do_sample=True, temperature=0.7, top_p=0.9,
                                            stop=("\n\n",))
    assert task.items == ["Be brief.", "hi"]


# -- what we cannot honour, unknown names, conflicts: one 400 naming everything ---------------------

def test_unsupported_values_unknown_fields_and_type_errors_in_one_error():
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "tools": [{"type": "function"}],
            "frequncy_penalty": 0.5, "topp": 0.9, "temperature": "hot", "max_tokens": 0}
    message, param = problems(body, ChatCompletionRequest)
    assert param.split(",") == ["logprobs", "tools", "frequncy_penalty", "topp", "max_tokens", "temperature"]
    assert "token log-probabilities are not returned" in message and "no tool calling" in message
    assert "frequncy_penalty: unknown field (did you mean 'frequency_penalty'?)" in message
    assert "topp: unknown field (did you mean 'top_p'?)" in message
    assert "temperature: Input should be a valid number" in message
    assert "max_tokens: Input should be greater than or equal to 1" in message


@pytest.mark.parametrize("body,field,words", [
    ({"prompt": "x", "size": "64x64", "width": 32, "height": 64}, "size", ["given twice", "64x64", "32x64"]),
    ({"prompt": "x", "num_timesteps": 5, "num_inference_steps": 4}, "num_timesteps", ["num_inference_steps=4"]),
    ({"prompt": "x", "seed": 1, "extra_body": {"seed": 2}}, "seed", ["extra_body.seed=2"]),
    ({"prompt": "x", "cfg_text_scale": 4, "guidance_scale": 5}, "cfg_text_scale", ["guidance_scale=5"]),
    ({"prompt": "x", "width": 64}, "height", ["width and height go together"]),
    ({"prompt": "x", "background": "transparent"}, "background", ["opaque RGB"]),
    ({"prompt": "x", "extra_params": [1]}, "extra_params", ["must be an object"]),
    ({"prompt": "x", "output_compression": 101}, "output_compression", ["less than or equal to 100"]),
    ({"prompt": "x", "partial_images": 4}, "partial_images", ["less than or equal to 3"]),
    ({"prompt": "x", "quality": "ultra"}, "quality", ["'low'", "'hd'"]),
])
def test_conflicts_and_bad_values(body, field, words):
    message, param = problems(body, ImageGenerationRequest)
    assert param == field, message
    assert all(w in message for w in words), message


def test_same_value_twice_is_no_conflict():
    request = parse({"prompt": "x", "size": "64x32", "width": 64, "height": "32", "num_timesteps": 4,
                     "extra_body": {"num_inference_steps": 4}}, ImageGenerationRequest)
    assert (request.size, request.num_timesteps) == ("64x32", 4)


def test_edit_mask_is_refused_and_images_are_a_list():
    message, param = problems({"prompt": "x", "image": ["aGk="], "mask": ["aGk="]}, ImageEditRequest)
    assert param == "mask" and "inpainting masks are not supported" in message
    assert parse({"prompt": "x", "image": ["aGk=", "aGk="]}, ImageEditRequest).image == ["aGk=", "aGk="]


def test_aliases_only_target_our_fields():
    for alias, target in [*ALIASES.items(), *(p for table in ROUTE_ALIASES.values() for p in table.items())]:
        assert any(target in m.model_fields for m in (ImageGenerationRequest, ImageEditRequest,
                                                       ChatCompletionRequest)), (alias, target)


def test_limits_name_the_field():
    request = parse({"messages": [{"role": "user", "content": "hi"}], "n": 9}, ChatCompletionRequest)
    with pytest.raises(InvalidRequest, match="n must be at most 4") as info:
        request.to_task(LIMITS)
    assert info.value.param == "n"


# -- HTTP: error shape, models ------------------------------------------------------------------

class StubService:
    """Validates image parameters as the service does, then refuses the request as overloaded."""

    def __init__(self):
        self.args = AppArgs()
        self.limits = self.args.limits
        self.model_name = "bagel-demo"

    async def start_images(self, task, n):
        task.params.validate(256, 16)
        raise Overloaded("busy", retry_after_s=1)


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(StubService))


def test_http_error_names_every_field(client):
    r = client.post("/v1/images/generations", json={"prompt": 3, "stepz": 4, "seed": -1, "mask": None})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert set(error["param"].split(",")) == {"prompt", "stepz", "seed", "mask"}  # masks belong to edits
    assert "mask: unknown field" in error["message"]
    r = client.post("/v1/images/generations", json={"prompt": "x", "cfg_text_scale": 0.5, "timestep_shift": 0,
                                                     "size": "72x64"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "cfg_text_scale,timestep_shift,width"
    r = client.post("/v1/images/generations", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize("fields,param", [
    ({"output_format": "gif"}, "output_format"),
    ({"output_format": "png", "output_compression": 50}, "output_compression"),
    ({"response_format": "url", "stream": True}, "response_format"),
    ({"quality": "low", "num_timesteps": 30}, "quality,num_timesteps"),
])
def test_http_response_options_we_cannot_honour_are_refused(client, fields, param):
    r = client.post("/v1/images/generations", json={"prompt": "x", **fields})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_http_response_options_are_accepted(client):
    for fields in ({"response_format": "url", "output_format": "webp", "output_compression": 40},
                   {"response_format": "b64_json", "output_format": "png", "output_compression": 100,
                    "quality": "high", "size": "auto", "partial_images": 3, "stream": True}):
        r = client.post("/v1/images/generations", json={"prompt": "x", **fields})
        assert r.status_code == 429, r.text  # accepted: the stub then refuses the work


def test_model_by_id(client):
    r = client.get("/v1/models/bagel-demo")
    assert r.status_code == 200 and r.json() == {"id": "bagel-demo", "object": "model", "created": 0,
                                                 "owned_by": "bagel-serve"}
    r = client.get("/v1/models/ByteDance-Seed/BAGEL-7B-MoT")
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "The model 'ByteDance-Seed/BAGEL-7B-MoT' does not exist; this service "
                                             "serves 'bagel-demo'", "type": "invalid_request_error",
                                  "param": "model", "code": "model_not_found"}}


def test_a_flood_of_unknown_fields_gives_a_bounded_error():
    body = {"prompt": "x", **{f"field_{i}_" + "x" * 5000: i for i in range(500)}}
    message, param = problems(body, ImageGenerationRequest)
    assert len(message) < 4000 and message.endswith("and 480 more problems")
    assert len(param.split(",")) == 20
