"""Drop-in compatibility, through the real `openai` Python client against the Serve app (one
stage, parity fixture, float32 on CPU): the request shapes documented by the other BAGEL
servers (vLLM-Omni's examples/online_serving/bagel and diffusion chat API, M*'s OpenAI adapter
and SDK, SGLang's BAGEL sampling parameters) and the OpenAI SDK's own parameters. Each case
works, or fails as the README's compatibility table says; outputs are compared with the
in-process pipeline on the same inputs (within one pixel level, text exactly).
"""
from __future__ import annotations

import base64
import io
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image

from bagel_model.transforms import open_image
from pipelines.local import LocalExecutor
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS, ImageParams, TextParams
from pipelines.tasks import generate_image, understand

from .service_app import data_url, max_pixel_diff, png_bytes, running_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

STEPS = 4
T2I = ImageParams(num_timesteps=STEPS, height=64, width=64)
EDIT = replace(EDIT_DEFAULTS, num_timesteps=STEPS)
PROMPT = "A beautiful sunset over mountains"
EDIT_PROMPT = "Make the cat stand up"
QUESTION = "Describe this image in detail"
NEGATIVE = "blurry, low quality"
TOKENS = 6


class Reference:
    """The in-process pipeline on the same checkpoint; results cached."""

    def __init__(self, checkpoint: Path, images: dict[str, bytes]):
        self.executor = LocalExecutor.from_checkpoint(checkpoint, dtype=torch.float32)
        self.images = images

    @lru_cache(maxsize=None)
    def image(self, items: tuple, params: ImageParams, seed: int, negative: str | None = None,
              think_tokens: int | None = None):
        items = [open_image(self.images[i]) if i in self.images else i for i in items]
        return generate_image(self.executor, items, params, noise=NoiseSource(seed), negative_prompt=negative,
                              think=think_tokens is not None, text_params=TextParams(max_new_tokens=think_tokens or 1))

    @lru_cache(maxsize=None)
    def text(self, items: tuple, max_tokens: int, think: bool = False):
        items = [open_image(self.images[i]) if i in self.images else i for i in items]
        return understand(self.executor, items, TextParams(max_new_tokens=max_tokens), think=think)


class App:
    def __init__(self, url: str, ref: Reference, inputs: dict[str, bytes]):
        self.url = url
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        self.ref = ref
        self.inputs = inputs


@pytest.fixture(scope="module")
def app(ray_url, checkpoint_dir, fixture_dir) -> App:
    gradient = (fixture_dir / "inputs" / "input_gradient.png").read_bytes()
    second = png_bytes(Image.open(io.BytesIO(gradient)).convert("RGB").rotate(90).resize((64, 48)))
    inputs = {"<gradient>": gradient, "<second>": second}
    args = {"checkpoint_dir": str(checkpoint_dir), "num_stages": 1, "device": "cpu", "dtype": "float32"}
    with running_app(ray_url, args):
        yield App(ray_url, Reference(checkpoint_dir, inputs), inputs)


def assert_same_image(got: bytes | str, expected, what: str) -> None:
    if isinstance(got, str):
        got = base64.b64decode(got.removeprefix("data:image/png;base64,"))
    assert Image.open(io.BytesIO(got)).size == expected.image.size, what
    diff = max_pixel_diff(got, expected.image)
    assert diff <= 1, f"{what}: max abs pixel difference {diff}"


def image_part(content) -> str:
    """The data URL of the first image_url part of a chat message's content."""
    assert isinstance(content, list), f"expected content parts, got {content!r}"
    assert content[0]["type"] == "image_url"
    url = content[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    return url


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def picture(app: App, name: str = "<gradient>") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(app.inputs[name])}}


# -- vLLM-Omni: chat completions with modalities -------------------------------------------------

def test_vllm_omni_text_to_image(app):
    """examples/online_serving/bagel: text2img (the prompt wrapped in <|im_start|> ... <|im_end|>)."""
    r = app.client.chat.completions.create(
        model="ByteDance-Seed/BAGEL-7B-MoT", messages=user(text(f"<|im_start|>{PROMPT}<|im_end|>")),
        modalities=["image"], extra_body={"height": 64, "width": 64, "num_inference_steps": STEPS, "seed": 42})
    [choice] = r.choices
    assert r.object == "chat.completion" and choice.finish_reason == "stop"
    assert_same_image(image_part(choice.message.content), app.ref.image((PROMPT,), T2I, 42), "text2img")


def test_vllm_omni_image_to_image_takes_the_input_size(app):
    """img2img: the text part before the image part, no size: the output has the input's size."""
    r = app.client.chat.completions.create(
        model="bagel", messages=user(text(f"<|im_start|>{EDIT_PROMPT}<|im_end|>"), picture(app)),
        modalities=["image"], extra_body={"num_inference_steps": STEPS, "seed": 42})
    expected = app.ref.image(("<gradient>", EDIT_PROMPT), EDIT, 42)
    assert_same_image(image_part(r.choices[0].message.content), expected, "img2img")


def test_vllm_omni_image_to_image_with_a_size(app):
    """The example's curl payload sends height and width with the image: the canvas takes them."""
    r = app.client.chat.completions.create(
        model="bagel", messages=user(text(f"<|im_start|>{EDIT_PROMPT}<|im_end|>"), picture(app)),
        modalities=["image"], extra_body={"height": 32, "width": 48, "num_inference_steps": STEPS, "seed": 42})
    expected = app.ref.image(("<gradient>", EDIT_PROMPT), replace(EDIT, height=32, width=48), 42)
    assert_same_image(image_part(r.choices[0].message.content), expected, "img2img with size")


def test_vllm_omni_image_to_text_with_a_chat_template_in_the_prompt(app):
    """img2text: the example's text carries a whole chat template and <|image_pad|>; its Python
    client also sends its default image knobs, which text answers ignore."""
    templated = f"<|im_start|>user\n<|image_pad|>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    r = app.client.chat.completions.create(
        model="bagel", messages=user(text(templated), picture(app)), modalities=["text"], max_tokens=TOKENS,
        extra_body={"height": 512, "width": 512, "num_inference_steps": 25, "seed": 42})
    assert r.choices[0].message.content == app.ref.text(("<gradient>", QUESTION), TOKENS).text


def test_vllm_omni_text_to_text(app):
    r = app.client.chat.completions.create(
        model="bagel", messages=user(text("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                          "<|im_start|>assistant\n")), modalities=["text"], max_tokens=TOKENS)
    assert r.choices[0].message.content == app.ref.text(("What is the capital of France?",), TOKENS).text


def test_vllm_omni_negative_prompt_and_raw_json_extra_body(app):
    """The diffusion chat API doc: raw JSON clients nest the knobs in "extra_body"; the example
    client's --negative sends negative_prompt (the text-free guidance branch)."""
    body = {"height": 64, "width": 64, "num_inference_steps": STEPS, "seed": 5, "negative_prompt": NEGATIVE}
    r = app.client.chat.completions.create(model="bagel", messages=[{"role": "user", "content": PROMPT}],
                                           modalities=["image"], extra_body={"extra_body": body})
    expected = app.ref.image((PROMPT,), T2I, 5, NEGATIVE)
    assert_same_image(image_part(r.choices[0].message.content), expected, "negative prompt")
    assert max_pixel_diff(expected.image, app.ref.image((PROMPT,), T2I, 5).image) > 5


def test_chat_image_stream(app):
    """Streamed chat images: the role, step progress (chunk field `progress`), the image as a
    content part, then the finish reason, all as chat.completion.chunk objects."""
    stream = app.client.chat.completions.create(
        model="bagel", messages=[{"role": "user", "content": PROMPT}], modalities=["image"], stream=True,
        stream_options={"include_usage": True}, extra_body={"size": "64x64", "num_timesteps": STEPS, "seed": 9})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    progress = [c.progress for c in chunks if getattr(c, "progress", None)]
    assert [(p["step"], p["num_steps"]) for p in progress] == [(i, STEPS - 1) for i in range(1, STEPS)]
    [image] = [c.choices[0].delta.content for c in chunks if c.choices and isinstance(c.choices[0].delta.content, list)]
    assert_same_image(image_part(image), app.ref.image((PROMPT,), T2I, 9), "streamed chat image")
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_chat_think_then_image(app):
    """modalities ["text", "image"] with think: the image part, then the thought as a text part."""
    r = app.client.chat.completions.create(
        model="bagel", messages=[{"role": "user", "content": PROMPT}], modalities=["text", "image"],
        max_completion_tokens=TOKENS, extra_body={"think": True, "size": "64x64", "num_timesteps": STEPS, "seed": 3})
    content = r.choices[0].message.content
    expected = app.ref.image((PROMPT,), T2I, 3, None, TOKENS)
    assert_same_image(image_part(content), expected, "think + image")
    assert content[1] == {"type": "text", "text": expected.thought.text}


# -- M*: images with extra_body knobs, edits as multipart -------------------------------------------

def test_mstar_images_generate_with_think_mode(app):
    """M*'s OpenAI adapter passes extra_body knobs through (its benchmark adds max_tokens and
    max_output_tokens, the thought's budget)."""
    r = app.client.images.generate(
        model="bagel", prompt=PROMPT, n=1, response_format="b64_json",
        extra_body={"width": 64, "height": 64, "think_mode": True, "max_tokens": TOKENS, "max_output_tokens": TOKENS,
                    "cfg_text_scale": 4.0, "cfg_img_scale": 1.0, "cfg_interval": [0.4, 1.0],
                    "cfg_renorm_type": "global", "cfg_renorm_min": 0.0, "image_preprocess": "default",
                    "num_timesteps": STEPS, "seed": 11})
    expected = app.ref.image((PROMPT,), T2I, 11, None, TOKENS)
    assert r.data[0].revised_prompt == expected.thought.text
    assert_same_image(r.data[0].b64_json, expected, "M* think")


def test_mstar_edit_form_fields(app):
    """M*'s benchmark client: multipart with width/height and JSON-encoded knobs as form fields."""
    form = {"model": "ByteDance-Seed/BAGEL-7B-MoT", "prompt": EDIT_PROMPT, "n": "1", "response_format": "b64_json",
            "height": "48", "width": "64", "cfg_img_scale": "2.0", "cfg_interval": "[0.0, 1.0]",
            "cfg_renorm_type": "text_channel", "image_preprocess": "default", "max_tokens": "128",
            "max_output_tokens": "128", "num_timesteps": str(STEPS), "seed": "12"}
    r = httpx.post(f"{app.url}/v1/images/edits", data=form, timeout=120,
                   files={"image": ("input.png", app.inputs["<gradient>"], "image/png")})
    assert r.status_code == 200, r.text
    expected = app.ref.image(("<gradient>", EDIT_PROMPT), replace(EDIT, height=48, width=64), 12)
    assert_same_image(r.json()["data"][0]["b64_json"], expected, "M* edit")


# -- SGLang: BAGEL sampling parameter names ----------------------------------------------------------

def test_sglang_images_generate(app):
    r = app.client.images.generate(
        model="bagel", prompt=PROMPT, size="64x64", n=1, response_format="b64_json",
        extra_body={"num_inference_steps": STEPS, "guidance_scale": 5.0, "flow_shift": 2.0,
                    "negative_prompt": NEGATIVE, "seed": 13, "enable_taylorseer": False})
    expected = app.ref.image((PROMPT,), replace(T2I, cfg_text_scale=5.0, timestep_shift=2.0), 13, NEGATIVE)
    assert_same_image(r.data[0].b64_json, expected, "SGLang t2i")


def test_sglang_edit_true_cfg_scale_is_image_guidance(app):
    r = app.client.images.edit(
        model="bagel", image=("input.png", app.inputs["<gradient>"], "image/png"), prompt=EDIT_PROMPT,
        extra_body={"true_cfg_scale": 1.5, "guidance_scale": 3.0, "num_inference_steps": STEPS, "seed": 14})
    expected = app.ref.image(("<gradient>", EDIT_PROMPT), replace(EDIT, cfg_img_scale=1.5, cfg_text_scale=3.0), 14)
    assert_same_image(r.data[0].b64_json, expected, "SGLang edit")


def test_sglang_chat_enable_thinking(app):
    r = app.client.chat.completions.create(
        model="bagel", messages=user(text(QUESTION), picture(app)), max_completion_tokens=TOKENS,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert r.choices[0].message.content == app.ref.text(("<gradient>", QUESTION), TOKENS, think=True).text


# -- OpenAI's own parameters -------------------------------------------------------------------

def test_openai_images_generate_fields(app):
    r = app.client.images.generate(
        model="gpt-image-1", prompt=PROMPT, n=2, size="64x64", quality="auto", moderation="low", user="u1",
        background="opaque", output_format="png", output_compression=100, response_format="b64_json",
        style="vivid", safety_identifier="s1", extra_body={"num_timesteps": STEPS, "seed": 20})
    assert [d.seed for d in r.data] == [20, 21]
    for d in r.data:
        assert_same_image(d.b64_json, app.ref.image((PROMPT,), T2I, d.seed), f"seed {d.seed}")


def test_openai_images_edit_with_several_images(app):
    """image=[a, b]: the SDK sends repeated image[] parts; both are the model's context, in order."""
    images = [("a.png", app.inputs["<gradient>"], "image/png"), ("b.png", app.inputs["<second>"], "image/png")]
    r = app.client.images.edit(model="gpt-image-1", image=images, prompt=EDIT_PROMPT, n=1, input_fidelity="high",
                               extra_body={"num_timesteps": STEPS, "seed": 21})
    expected = app.ref.image(("<gradient>", "<second>", EDIT_PROMPT), EDIT, 21)
    assert_same_image(r.data[0].b64_json, expected, "two images")
    assert max_pixel_diff(expected.image, app.ref.image(("<second>", EDIT_PROMPT), EDIT, 21).image) > 5


def test_openai_chat_stream_with_usage_stop_top_p_and_n(app):
    full = app.ref.text(("<gradient>", QUESTION), 12)
    assert len(full.text) >= 6, full.text
    stop = full.text[3:6]
    stream = app.client.chat.completions.create(
        model="gpt-4o", messages=user(picture(app), text(QUESTION)), max_tokens=12, n=2, stop=[stop], top_p=0.5,
        stream=True, stream_options={"include_usage": True}, seed=1, user="u", frequency_penalty=0, logprobs=False)
    answers: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = list(stream)
    for c in chunks[:-1]:
        [choice] = c.choices
        answers[choice.index] = answers.get(choice.index, "") + (choice.delta.content or "")
        finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    cut = full.text[:full.text.find(stop)]
    assert answers == {0: cut, 1: cut} and finish == {0: "stop", 1: "stop"}  # greedy: top_p needs temperature > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_openai_models(app):
    [card] = app.client.models.list().data
    assert app.client.models.retrieve(card.id).id == card.id
    with pytest.raises(openai.NotFoundError) as info:
        app.client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


def test_openai_fields_we_cannot_honour_are_clear_400s(app):
    with pytest.raises(openai.BadRequestError) as info:
        app.client.chat.completions.create(model="bagel", messages=[{"role": "user", "content": "hi"}],
                                           logprobs=True, tools=[{"type": "function", "function": {"name": "f"}}],
                                           extra_body={"num_inference_step": 3})
    assert info.value.body["param"] == "logprobs,tools,num_inference_step"
    message = info.value.body["message"]
    assert "log-probabilities" in message and "tool calling" in message
    assert "did you mean 'num_inference_steps'?" in message
    with pytest.raises(openai.BadRequestError) as info:
        app.client.images.generate(model="bagel", prompt=PROMPT, background="transparent", partial_images=2,
                                   extra_body={"cfg_text_scale": 0.5})
    assert info.value.body["param"] == "background"  # the unsupported value first; ranges are checked after
    with pytest.raises(openai.BadRequestError) as info:
        app.client.images.generate(model="bagel", prompt=PROMPT, size="72x64",
                                   extra_body={"cfg_text_scale": 0.5, "timestep_shift": 0})
    assert info.value.body["param"] == "cfg_text_scale,timestep_shift,width"


# -- prefix caching --------------------------------------------------------------------------------

def test_cached_tokens_of_a_follow_up_turn_and_a_second_edit(app):
    """The second turn of a chat reuses the first turn's prompt, the second edit of an image
    (same seed: the same posterior noise) the image's blocks; usage says how many tokens."""
    question, follow_up = "Which colours does this gradient have?", "And which is the brightest?"
    first = app.client.chat.completions.create(model="m", messages=user(picture(app), text(question)), max_tokens=4)
    answer = first.choices[0].message.content or "none"
    turn2 = [*user(picture(app), text(question)), {"role": "assistant", "content": answer},
             {"role": "user", "content": follow_up}]
    second = app.client.chat.completions.create(model="m", messages=turn2, max_tokens=4)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
    assert second.choices[0].message.content == app.ref.text(("<gradient>", question, answer, follow_up), 4).text

    image = [("a.png", app.inputs["<second>"], "image/png")]
    edits = [app.client.images.edit(model="m", image=image, prompt=p, extra_body={"num_timesteps": STEPS, "seed": 31})
             for p in ("make it night", "add a moon")]
    details = [e.model_dump()["usage"]["input_tokens_details"] for e in edits]
    assert details[0]["cached_tokens"] == 0 and details[1]["cached_tokens"] == details[1]["image_tokens"] > 0
    assert_same_image(edits[1].data[0].b64_json, app.ref.image(("<second>", "add a moon"), EDIT, 31), "second edit")

    health = httpx.get(f"{app.url}/health", timeout=30).json()
    assert health["prefix_cache"]["hits"] >= 2 and health["prefix_cache"]["entries"] > 0, health["prefix_cache"]
    assert all(s["prefix_cache_contexts"] > 0 and s["live_contexts"] == 0 for s in health["stages"]), health
    metrics = httpx.get(f"{app.url}/metrics", timeout=30).text
    hits = [line for line in metrics.splitlines() if line.startswith("bagel_prefix_cache_hits{")]
    assert hits and float(hits[0].split()[-1]) >= 2, hits
