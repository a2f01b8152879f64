"""Bad input gives a clear, typed error (`InvalidRequest`, naming the field) before any model
work, and an exception in the middle of a task never leaks a KV cache.

Runs on the parity fixture's float32 executor (max image side 256, stride 16).
"""
from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_model.errors import BagelError, InvalidRequest
from bagel_model.transforms import InvalidImage, open_image
from pipelines.noise import NoiseSource
from pipelines.params import EDIT_DEFAULTS, ImageParams, TextParams, with_overrides
from pipelines.tasks import generate_image, understand

FAST = ImageParams(num_timesteps=3, height=32, width=32)


class Boom(RuntimeError):
    pass


class CountingExecutor:
    """Delegates to an executor and counts model calls (to show validation comes first)."""

    def __init__(self, inner):
        self.inner = inner
        self.config, self.tokenizer, self.device = inner.config, inner.tokenizer, inner.device
        self.calls = 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name in ("prefill", "decode", "denoise", "encode_vit", "encode_vae", "decode_latents"):
            def counted(*args, **kwargs):
                self.calls += 1
                return attr(*args, **kwargs)
            return counted
        return attr


def image(width: int = 48, height: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture
def counting(executor):
    wrapped = CountingExecutor(executor)
    yield wrapped
    assert executor.live_contexts() == [], "contexts leaked"


def test_config_limits(executor):
    # The numbers the out-of-range cases below rely on.
    assert executor.config.max_image_side == 256
    assert executor.config.latent_downsample == 16


BAD_IMAGE_PARAMS = [
    ("cfg_text_scale", dict(cfg_text_scale=0.5)),
    ("cfg_text_scale", dict(cfg_text_scale=101.0)),
    ("cfg_text_scale", dict(cfg_text_scale=float("nan"))),
    ("cfg_img_scale", dict(cfg_img_scale=0.0)),
    ("cfg_img_scale", dict(cfg_img_scale=float("inf"))),
    ("cfg_interval", dict(cfg_interval=(0.8, 0.2))),
    ("cfg_interval", dict(cfg_interval=(-0.1, 1.0))),
    ("cfg_interval", dict(cfg_interval=(0.4, 1.5))),
    ("cfg_interval", dict(cfg_interval=(0.4,))),
    ("cfg_interval", dict(cfg_interval=(0.1, 0.5, 1.0))),
    ("cfg_interval", dict(cfg_interval="ab")),
    ("timestep_shift", dict(timestep_shift=0.0)),
    ("timestep_shift", dict(timestep_shift=-1.0)),
    ("timestep_shift", dict(timestep_shift=1000.0)),
    ("num_timesteps", dict(num_timesteps=1)),
    ("num_timesteps", dict(num_timesteps=0)),
    ("num_timesteps", dict(num_timesteps=1001)),
    ("num_timesteps", dict(num_timesteps=2.5)),
    ("cfg_renorm_min", dict(cfg_renorm_min=-0.1)),
    ("cfg_renorm_min", dict(cfg_renorm_min=1.5)),
    ("cfg_renorm_type", dict(cfg_renorm_type="local")),
    ("cfg_renorm_type", dict(cfg_renorm_type="")),
    ("height", dict(height=100)),  # not a multiple of 16
    ("height", dict(height=272)),  # larger than the model's 256
    ("height", dict(height=0)),
    ("height", dict(height=-16)),
    ("height", dict(height=64.0)),  # not an integer
    ("width", dict(width=8)),
    ("width", dict(width=1024)),
    ("width", dict(width=17)),
    ("cfg_text_scale", dict(cfg_text_scale="4")),
]


@pytest.mark.parametrize("field,change", BAD_IMAGE_PARAMS, ids=[f"{f}={v}" for f, c in BAD_IMAGE_PARAMS
                                                                for v in c.values()])
def test_image_params_out_of_range(field, change, counting):
    params = replace(FAST, **change)
    with pytest.raises(InvalidRequest, match=rf"^{field}\b"):
        generate_image(counting, ["a prompt"], params, noise=NoiseSource(seed=0))
    assert counting.calls == 0, "the model ran before the parameters were checked"
    # The same check is available without an executor.
    with pytest.raises(InvalidRequest, match=rf"^{field}\b"):
        params.validate(256, 16)


def test_image_params_at_the_limits_are_accepted():
    for params in (ImageParams(), EDIT_DEFAULTS, ImageParams(cfg_text_scale=1.0, cfg_img_scale=100.0),
                   ImageParams(cfg_interval=(0.0, 0.0), num_timesteps=2, cfg_renorm_min=1.0,
                               cfg_renorm_type="channel", height=16, width=256, timestep_shift=100.0),
                   ImageParams(cfg_interval=[0.4, 1.0])):
        assert params.validate(256, 16) is params


def test_with_overrides_rejects_unknown_names():
    with pytest.raises(InvalidRequest, match=r"unknown parameters \['guidance', 'steps'\]"):
        with_overrides(ImageParams(), {"steps": 10, "guidance": 3.0})
    assert with_overrides(ImageParams(), {"cfg_interval": [0.2, 0.9]}).cfg_interval == (0.2, 0.9)


BAD_ITEMS = [
    ([], "empty"),
    ([""], "text input is empty"),
    (["   \n\t "], "text input is empty"),
    (["ok", "  "], "text input is empty"),
    ([42], "strings or images, got int"),
    (["ok", b"bytes"], "strings or images, got bytes"),
    (["ok", None], "strings or images, got NoneType"),
]


@pytest.mark.parametrize("items,message", BAD_ITEMS)
def test_bad_items(items, message, counting):
    with pytest.raises(InvalidRequest, match=message):
        generate_image(counting, items, FAST)
    with pytest.raises(InvalidRequest, match=message):
        understand(counting, items, TextParams(max_new_tokens=2))
    assert counting.calls == 0


def test_image_only_generation_is_refused(counting):
    with pytest.raises(InvalidRequest, match="needs a text prompt"):
        generate_image(counting, [image()], EDIT_DEFAULTS)
    assert counting.calls == 0
    # Understanding an image alone is fine.
    result = understand(counting, [image()], TextParams(max_new_tokens=2))
    assert len(result.token_ids) <= 2


def test_size_with_an_input_image_sets_the_canvas(executor):
    """Without a size an edit's output takes the input image's (VAE-resized) size; a given
    height or width replaces that side (as vLLM-Omni's BAGEL does)."""
    edit = replace(EDIT_DEFAULTS, num_timesteps=2)
    size = generate_image(executor, [image(), "make it blue"], edit, noise=NoiseSource(seed=0)).image.size
    assert generate_image(executor, [image(), "make it blue"], replace(edit, height=32, width=48),
                          noise=NoiseSource(seed=0)).image.size == (48, 32)
    assert generate_image(executor, [image(), "make it blue"], replace(edit, height=32),
                          noise=NoiseSource(seed=0)).image.size == (size[0], 32)
    assert executor.live_contexts() == []


def test_all_bad_fields_are_named_at_once(counting):
    params = replace(FAST, cfg_text_scale=0.5, timestep_shift=0.0, height=100)
    with pytest.raises(InvalidRequest) as info:
        generate_image(counting, ["a prompt"], params)
    assert info.value.param == "cfg_text_scale,timestep_shift,height"
    assert all(f in str(info.value) for f in ("cfg_text_scale must", "timestep_shift must", "height must"))
    with pytest.raises(InvalidRequest) as info:
        TextParams(max_new_tokens=0, temperature=-1.0, top_p=0.0, stop=("",)).validate()
    assert info.value.param == "max_new_tokens,temperature,top_p,stop"
    assert counting.calls == 0


@pytest.mark.parametrize("field,params", [
    ("max_new_tokens", TextParams(max_new_tokens=0)),
    ("max_new_tokens", TextParams(max_new_tokens=-5)),
    ("max_new_tokens", TextParams(max_new_tokens=40000)),
    ("max_new_tokens", TextParams(max_new_tokens=3.5)),
    ("temperature", TextParams(do_sample=True, temperature=-1.0)),
    ("temperature", TextParams(temperature=11.0)),
])
def test_text_params_out_of_range(field, params, counting):
    with pytest.raises(InvalidRequest, match=rf"^{field}\b"):
        understand(counting, ["hello"], params)
    # Think-mode generation decodes text with the same parameters.
    with pytest.raises(InvalidRequest, match=rf"^{field}\b"):
        generate_image(counting, ["hello"], FAST, think=True, text_params=params)
    assert counting.calls == 0


@pytest.mark.parametrize("data", [b"not an image", b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
                                  b"GIF89a" + b"\xff" * 20])
def test_open_image_rejects_garbage(data):
    with pytest.raises(InvalidImage) as info:
        open_image(data)
    assert isinstance(info.value, InvalidRequest) and isinstance(info.value, BagelError)


def test_open_image_rejects_truncated_and_huge(tmp_path):
    buf = io.BytesIO()
    image(64, 64).save(buf, format="PNG")
    data = buf.getvalue()
    assert open_image(data).size == (64, 64)
    with pytest.raises(InvalidImage):
        open_image(data[: len(data) // 2])
    with pytest.raises(InvalidImage, match="limit"):
        open_image(data, max_pixels=64 * 63)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    assert open_image(path).size == (64, 64)


def test_injected_noise_of_the_wrong_shape(counting):
    noise = NoiseSource(tensors=[torch.zeros(3, 64)])
    with pytest.raises(InvalidRequest, match=r"injected noise has shape \[3, 64\], expected \[4, 64\]"):
        generate_image(counting, ["a prompt"], FAST, noise=noise)


# --------------------------------------------------------------------------- no leaks

def test_exception_in_on_step_frees_contexts(executor):
    seen = []

    def on_step(progress):
        seen.append(progress.step)
        assert len(executor.live_contexts()) > 0  # mid-generation: the branches hold caches
        if progress.step == 2:
            raise Boom("client went away")
    with pytest.raises(Boom):
        generate_image(executor, [image(), "make it blue"], replace(EDIT_DEFAULTS, num_timesteps=5),
                       noise=NoiseSource(seed=0), on_step=on_step)
    assert seen == [1, 2]
    assert executor.live_contexts() == []


def test_exception_in_on_text_frees_contexts(executor):
    seen = []

    def on_text(delta):
        seen.append(delta)
        assert len(executor.live_contexts()) > 0
        if len(seen) == 3:
            raise Boom("client went away")
    with pytest.raises(Boom):
        understand(executor, [image(), "Describe this."], TextParams(max_new_tokens=50), on_text=on_text)
    assert len(seen) == 3
    assert executor.live_contexts() == []


def test_exception_in_think_on_text_frees_contexts(executor):
    def on_text(delta):
        raise Boom("stop")
    with pytest.raises(Boom):
        generate_image(executor, ["a car made of small cars"], FAST, think=True,
                       text_params=TextParams(max_new_tokens=20), on_text=on_text)
    assert executor.live_contexts() == []


def test_executor_failure_frees_contexts(executor):
    """An error raised by the executor itself (e.g. a failing stage) also frees everything."""
    class Failing(CountingExecutor):
        def denoise(self, segments, step):
            raise RuntimeError("stage 1 died")

    with pytest.raises(RuntimeError, match="stage 1 died"):
        generate_image(Failing(executor), ["a prompt"], FAST, noise=NoiseSource(seed=0))
    assert executor.live_contexts() == []
    # And the executor still works afterwards.
    result = generate_image(executor, ["a prompt"], FAST, noise=NoiseSource(seed=0))
    assert result.image.size == (32, 32)
    assert executor.live_contexts() == []

