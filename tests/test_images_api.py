"""OpenAI's images API through the real `openai` client against the Serve app (CPU, the parity
fixture, one stage): response_format b64_json and url (the URL store: GET, 404, expiry),
output_format png / jpeg / webp with output_compression, size "auto", n > 1 on edits, `user`,
quality as steps, 400s naming the unsupported field, and streaming in OpenAI's event shapes
(image_generation.* / image_edit.*) with partial images, next to our own progress events."""
from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from bagel_model.config import BagelConfig

from .service_app import png_bytes, running_app, sse_events

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

TTL_S = 5.0
FAST = {"num_timesteps": 4, "seed": 11}  # 3 steps
PREVIEWS = {"num_timesteps": 6, "seed": 12}  # 5 steps: previews after steps 2 and 4


@pytest.fixture(scope="module")
def app_url(ray_url, checkpoint_dir):
    args = {"checkpoint_dir": str(checkpoint_dir), "device": "cpu", "dtype": "float32", "image_url_ttl_s": TTL_S}
    with running_app(ray_url, args):
        yield ray_url


@pytest.fixture(scope="module")
def client(app_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def input_png() -> bytes:
    y, x = np.mgrid[0:48, 0:64]
    return png_bytes(Image.fromarray(np.stack([x * 4, y * 5, x + y], -1).astype(np.uint8)))


@pytest.fixture(scope="module")
def edit_size(checkpoint_dir, input_png) -> tuple[int, int]:
    """The size of an edit of `input_png`: the input's, as the model's transform resizes it."""
    return BagelConfig.from_checkpoint_dir(checkpoint_dir).vae_transform(Image.open(io.BytesIO(input_png))).size


def image_of(data: bytes | str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data) if isinstance(data, str) else data))
    image.load()
    return image


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def test_b64_json_by_default(client):
    result = client.images.generate(prompt="a red fox", size="64x64", user="u-1", extra_body=FAST)
    [item] = result.data
    assert item.url is None and image_of(item.b64_json).format == "PNG"
    assert image_of(item.b64_json).size == (64, 64)
    assert (result.output_format, result.size, result.quality, result.background) == ("png", "64x64", "auto", "opaque")


def test_url_serves_the_same_image_until_it_expires(client, app_url):
    b64 = client.images.generate(prompt="a red fox", size="64x64", extra_body=FAST).data[0].b64_json
    result = client.images.generate(prompt="a red fox", size="64x64", response_format="url", n=2, extra_body=FAST)
    urls = [d.url for d in result.data]
    assert all(d.b64_json is None for d in result.data) and len(set(urls)) == 2
    assert all(u.startswith(f"{app_url}/v1/images/files/") for u in urls)
    first = httpx.get(urls[0])  # no API key needed: the id is the key
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert 0 < int(first.headers["cache-control"].split("max-age=")[1]) <= TTL_S
    assert same_pixels(image_of(first.content), image_of(b64))  # same seed, same image
    assert not same_pixels(image_of(httpx.get(urls[1]).content), image_of(b64))  # the next seed's
    missing = httpx.get(f"{app_url}/v1/images/files/no-such-image")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    time.sleep(TTL_S + 0.5)
    gone = httpx.get(urls[0])
    assert gone.status_code == 404 and "expired" in gone.json()["error"]["message"]


@pytest.mark.parametrize("fmt,magic", [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_output_format_and_compression(client, fmt, magic):
    sizes = []
    for compression in (10, 95):
        result = client.images.generate(prompt="a red fox", size="64x64", output_format=fmt,
                                        output_compression=compression, extra_body=FAST)
        data = base64.b64decode(result.data[0].b64_json)
        assert data.startswith(magic) and result.output_format == fmt
        assert image_of(data).size == (64, 64)
        sizes.append(len(data))
    assert sizes[0] < sizes[1]
    url = client.images.generate(prompt="a red fox", size="64x64", output_format=fmt, response_format="url",
                                 extra_body=FAST).data[0].url
    assert httpx.get(url).headers["content-type"] == f"image/{fmt}"


def test_size_auto(client, input_png, edit_size):
    generated = client.images.generate(prompt="a red fox", size="auto", extra_body={**FAST, "num_timesteps": 2})
    assert image_of(generated.data[0].b64_json).size == (256, 256)  # the fixture model's largest square
    edited = client.images.edit(image=("in.png", input_png, "image/png"), prompt="make it blue", size="auto",
                                extra_body=FAST)
    assert image_of(edited.data[0].b64_json).size == edit_size  # the input's


def test_edits_with_n(client, input_png, edit_size):
    result = client.images.edit(image=("in.png", input_png, "image/png"), prompt="make it blue", n=2, user="u-2",
                                extra_body=FAST)
    assert [d.model_extra["seed"] for d in result.data] == [11, 12]
    a, b = (image_of(d.b64_json) for d in result.data)
    assert a.size == b.size == edit_size and not same_pixels(a, b)


def test_quality_is_a_number_of_steps(client, app_url):
    low = client.images.generate(prompt="a red fox", size="64x64", quality="low", extra_body={"seed": 3})
    steps = client.images.generate(prompt="a red fox", size="64x64", extra_body={"seed": 3, "num_timesteps": 20})
    assert low.quality == "low" and same_pixels(image_of(low.data[0].b64_json), image_of(steps.data[0].b64_json))
    with httpx.stream("POST", f"{app_url}/v1/images/generations", timeout=120,
                      json={"prompt": "a fox", "size": "64x64", "quality": "low", "stream": True}) as r:
        progress = [e for e in sse_events(r.iter_lines()) if isinstance(e, dict) and e["type"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, 20)) and progress[0]["num_steps"] == 19


@pytest.mark.parametrize("fields,param", [
    ({"output_format": "gif"}, "output_format"),
    ({"output_compression": 50}, "output_compression"),  # png is lossless
    ({"output_compression": 150, "output_format": "jpeg"}, "output_compression"),
    ({"response_format": "url", "stream": True}, "response_format"),
    ({"partial_images": 4, "stream": True}, "partial_images"),
    ({"quality": "low", "num_timesteps": 30}, "quality"),
    ({"quality": "ultra"}, "quality"),
    ({"response_format": "png"}, "response_format"),
])
def test_unsupported_values_are_a_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a red fox", size="64x64", extra_body={**FAST, **fields})
    assert param in e.value.message


def test_stream_in_openai_shapes_with_partial_images(client):
    plain = client.images.generate(prompt="a red fox", size="64x64", extra_body=PREVIEWS)
    stream = client.images.generate(prompt="a red fox", size="64x64", stream=True, partial_images=2,
                                    extra_body=PREVIEWS)
    events = list(stream)
    ours = [e for e in events if not e.type.startswith("image_generation.")]
    assert {e.type for e in ours} <= {"started", "progress"}  # ours, which OpenAI's clients skip
    theirs = [e for e in events if e.type.startswith("image_generation.")]
    assert [e.type for e in theirs] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    *partials, completed = theirs
    assert events[-1] is completed
    assert [p.partial_image_index for p in partials] == [0, 1]
    for p in partials:
        assert (p.size, p.output_format, p.quality, p.background) == ("64x64", "png", "auto", "opaque")
        assert p.created_at > 0
        preview = image_of(p.b64_json)  # the linear preview: 1/8 of each side
        assert preview.format == "PNG" and preview.size == (8, 8)
    assert [p.model_extra["step"] for p in partials] == [2, 4]
    assert same_pixels(image_of(completed.b64_json), image_of(plain.data[0].b64_json))
    assert (completed.size, completed.output_format, completed.quality) == ("64x64", "png", "auto")
    assert completed.usage.output_tokens == 16 and completed.usage.total_tokens >= 16  # 4x4 latent tokens
    # Each preview comes after its step's progress event (rendering it does not hold up the steps).
    kinds = [(e.type, e.model_extra.get("step")) for e in events if e.type != "started"]
    for step in (2, 4):
        assert kinds.index(("image_generation.partial_image", step)) > kinds.index(("progress", step))


def test_edit_stream_with_n_and_jpeg_previews(client, input_png, edit_size):
    stream = client.images.edit(image=("in.png", input_png, "image/png"), prompt="make it blue", stream=True,
                                partial_images=1, n=2, output_format="jpeg", extra_body=PREVIEWS)
    theirs = [e for e in stream if e.type.startswith("image_edit.")]
    assert [(e.type, e.model_extra["index"]) for e in theirs] == [
        ("image_edit.partial_image", 0), ("image_edit.completed", 0),
        ("image_edit.partial_image", 1), ("image_edit.completed", 1)]
    for e in theirs:
        assert e.output_format == "jpeg" and base64.b64decode(e.b64_json).startswith(b"\xff\xd8\xff")
        assert e.size == "{}x{}".format(*edit_size)
    assert image_of(theirs[1].b64_json).size == edit_size
    assert image_of(theirs[0].b64_json).size == (edit_size[0] // 8, edit_size[1] // 8)
    assert [theirs[1].model_extra["seed"], theirs[3].model_extra["seed"]] == [12, 13]


def test_stream_without_partial_images(client):
    events = list(client.images.generate(prompt="a red fox", size="64x64", stream=True, extra_body=FAST))
    assert [e.type for e in events if e.type.startswith("image_generation.")] == ["image_generation.completed"]
