"""What the pipelines do with the request features other servers' clients use: a negative
prompt (the text-free guidance branch's context), chat-template markup in prompts, several
input images, stop strings and top-p. Runs on the parity fixture (float32, CPU)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_model.errors import InvalidRequest
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS, ImageParams, TextParams
from pipelines.tasks import generate_image, understand
from pipelines.text import TextStream, next_token

from .recording import RecordingExecutor

PROMPT = "A red fox in the snow."
NEGATIVE = "blurry, dark, low quality"
GUIDED = ImageParams(num_timesteps=3, height=32, width=32, cfg_interval=(0.0, 1.0))


def image(seed: int, width: int = 48, height: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def t2i(executor, items, params=GUIDED, **kwargs):
    result = generate_image(executor, items, params, noise=NoiseSource(seed=3), **kwargs)
    assert executor.live_contexts() == []
    return result


# -- negative prompt ---------------------------------------------------------------------------

def test_negative_prompt_is_the_text_free_branch(executor):
    plain = t2i(executor, [PROMPT])
    assert torch.equal(t2i(executor, [PROMPT], negative_prompt="").latent, plain.latent), "empty == default"
    assert torch.equal(t2i(executor, [PROMPT], negative_prompt=None).latent, plain.latent)
    negative = t2i(executor, [PROMPT], negative_prompt=NEGATIVE)
    assert (negative.latent - plain.latent).abs().max() > 1e-3, "the negative prompt changed nothing"
    # Only the text guidance branch reads it: with text guidance off it has no effect.
    unguided = replace(GUIDED, cfg_text_scale=1.0)
    assert torch.equal(t2i(executor, [PROMPT], unguided, negative_prompt=NEGATIVE).latent,
                       t2i(executor, [PROMPT], unguided).latent)


def test_negative_prompt_context_is_the_negative_text_block(executor):
    """Text-to-image: the text-free context holds exactly <|im_start|>NEGATIVE<|im_end|> at
    position 0, as the conditional context of a request whose prompt is NEGATIVE does."""
    with_negative, as_prompt = RecordingExecutor(executor), RecordingExecutor(executor)
    t2i(with_negative, [PROMPT], negative_prompt=NEGATIVE)
    t2i(as_prompt, [NEGATIVE])
    got, expected = with_negative.caches_at_denoise["cfg_text"], as_prompt.caches_at_denoise["cond"]
    assert got.keys() == expected.keys() and got
    for layer, (k, v) in expected.items():
        torch.testing.assert_close(got[layer][0], k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[layer][1], v, atol=1e-5, rtol=1e-5)
    # The conditional and image-free contexts are unchanged.
    plain = RecordingExecutor(executor)
    t2i(plain, [PROMPT])
    for name in ("cond", "cfg_img"):
        for layer, (k, v) in plain.caches_at_denoise[name].items():
            assert torch.equal(with_negative.caches_at_denoise[name][layer][0], k)


def test_negative_prompt_in_an_edit(executor):
    edit = replace(EDIT_DEFAULTS, num_timesteps=3)
    plain = t2i(executor, [image(0), "make it blue"], edit)
    negative = t2i(executor, [image(0), "make it blue"], edit, negative_prompt=NEGATIVE)
    assert negative.image.size == plain.image.size
    assert (negative.latent - plain.latent).abs().max() > 1e-3


# -- chat-template markup ------------------------------------------------------------------------

@pytest.mark.parametrize("text,clean", [
    ("<|im_start|>A red fox in the snow.<|im_end|>", "A red fox in the snow."),  # vLLM-Omni's examples
    ("<|im_start|>user\n<|image_pad|>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n", "What is this?"),
    ("<|im_start|>system\nBe brief.<|im_end|>", "Be brief."),
    ("a <|vision_start|>cat<|vision_end|>", "a cat"),
    ("<|im_start|>users like it", "users like it"),  # a role word without its newline is text
    ("  no markup, spaces kept  ", "  no markup, spaces kept  "),
])
def test_clean_prompt(executor, text, clean):
    assert executor.tokenizer.clean_prompt(text) == clean


def test_markup_in_prompts_reaches_the_model_as_the_plain_text(executor):
    wrapped = t2i(executor, ["<|im_start|>" + PROMPT + "<|im_end|>"], negative_prompt="<|im_start|>dark<|im_end|>")
    assert torch.equal(wrapped.latent, t2i(executor, [PROMPT], negative_prompt="dark").latent)
    params = TextParams(max_new_tokens=4)
    templated = understand(executor, [image(1), "<|im_start|>user\n<|image_pad|>\nWhat is this?<|im_end|>\n"
                                                "<|im_start|>assistant\n"], params)
    assert templated == understand(executor, [image(1), "What is this?"], params)
    with pytest.raises(InvalidRequest, match="text input is empty"):
        understand(executor, ["<|im_start|><|im_end|>"], params)


# -- several input images ----------------------------------------------------------------------

def test_several_input_images_are_all_context(executor):
    edit = replace(EDIT_DEFAULTS, num_timesteps=3)
    both = t2i(executor, [image(0), image(1, 64, 32), "combine them"], edit)
    second = t2i(executor, [image(1, 64, 32), "combine them"], edit)
    first = t2i(executor, [image(0), "combine them"], edit)
    assert both.image.size == second.image.size, "the output takes the last input image's size"
    assert not torch.equal(both.latent, second.latent) and both.latent.shape == second.latent.shape
    assert first.image.size != both.image.size


# -- stop strings and top-p ----------------------------------------------------------------------

class CharTokenizer:
    """Token i is chr(i); decoding joins the characters."""

    @staticmethod
    def decode(ids: list[int]) -> str:
        return "".join(map(chr, ids))


def stream(text: str, stop: tuple[str, ...]) -> tuple[list[str], TextStream]:
    s, deltas = TextStream(CharTokenizer(), stop), []
    for ch in text:
        deltas.append(s.push(ord(ch)))
        if s.stopped:
            break
    deltas.append(s.finish())
    return deltas, s


def test_text_stream_stops_before_a_stop_string_and_never_sends_part_of_it():
    deltas, s = stream("Hello, world. Bye", ("world",))
    assert s.stopped and s.text == "Hello, " and "".join(deltas) == "Hello, "
    assert not any("w" in d for d in deltas), deltas
    deltas, s = stream("say wow now", ("wor",))  # "wo" was held back, then released
    assert not s.stopped and "".join(deltas) == "say wow now" == s.text
    deltas, s = stream("abc", ())
    assert deltas[:3] == ["a", "b", "c"] and s.text == "abc"


def test_stop_string_ends_an_answer(executor):
    params = TextParams(max_new_tokens=24)
    full = understand(executor, [image(2), "Describe it."], params)
    assert len(full.text) >= 6, f"the fixture's answer is too short to cut: {full.text!r}"
    stop = full.text[3:6]
    cut = full.text[:full.text.find(stop)]
    deltas: list[str] = []
    result = understand(executor, [image(2), "Describe it."], replace(params, stop=(stop, "\x00never")),
                        on_text=deltas.append)
    assert (result.text, result.finish_reason) == (cut, "stop")
    assert "".join(deltas) == cut
    assert len(result.token_ids) <= len(full.token_ids)
    assert executor.live_contexts() == []


def test_top_p_keeps_only_the_most_probable_tokens():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    generator = torch.Generator().manual_seed(0)
    narrow = TextParams(do_sample=True, temperature=1.0, top_p=0.3)
    assert {next_token(logits, narrow, generator) for _ in range(50)} == {1}
    two = TextParams(do_sample=True, temperature=1.0, top_p=0.6)
    assert {next_token(logits, two, generator) for _ in range(200)} == {1, 2}
    wide = TextParams(do_sample=True, temperature=1.0)
    assert len({next_token(logits, wide, generator) for _ in range(200)}) >= 4
