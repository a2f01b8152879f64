"""The images response's building blocks on their own (no Ray): output formats and compression,
the URL store's bounds and expiry, and how request fields become a task (quality, size,
partial images)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bagel_model.errors import InvalidRequest
from cluster.args import Limits
from cluster.image_encoding import OutputFormat, encode_image
from cluster.image_store import ImageStore
from cluster.normalize import parse
from cluster.protocol import ImageGenerationRequest


def photo() -> Image.Image:
    """A smooth gradient with some noise: compresses like a picture, not like a flat fill."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:128]
    rgb = np.stack([x * 2, y * 2, (x + y)], axis=-1) + rng.normal(0, 12, (96, 128, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_formats(fmt, magic):
    image = photo()
    data = encode_image(image, OutputFormat(fmt).validate())
    assert data.startswith(magic)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == fmt.upper() and decoded.size == image.size
    diff = np.abs(np.asarray(decoded.convert("RGB"), dtype=int) - np.asarray(image, dtype=int))
    assert diff.max() == 0 if fmt == "png" else diff.mean() < 8  # lossless / close at the default quality 100


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_output_compression_is_the_lossy_quality(fmt):
    image = photo()
    sizes = {c: len(encode_image(image, OutputFormat(fmt, c).validate())) for c in (10, 50, 100)}
    assert sizes[10] < sizes[50] < sizes[100]
    assert encode_image(image, OutputFormat(fmt)) == encode_image(image, OutputFormat(fmt, 100))  # OpenAI's default


@pytest.mark.parametrize("output,words", [
    (OutputFormat("png", 50), ["output_compression", "png is lossless"]),
    (OutputFormat("svg"), ["output_format", "no GIF or SVG"]),
    (OutputFormat("gif"), ["output_format", "gif"]),
    (OutputFormat("jpeg", 101), ["output_compression", "[0, 100]"]),
])
def test_bad_output_formats(output, words):
    with pytest.raises(InvalidRequest) as e:
        output.validate()
    assert all(w in str(e.value) for w in words), str(e.value)
    assert e.value.param == words[0]


def test_png_takes_the_default_compression():
    """OpenAI's default (100) is harmless with PNG; clients that send every default keep working."""
    assert encode_image(photo(), OutputFormat("png", 100).validate()) == encode_image(photo(), OutputFormat("png"))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_store_expiry():
    clock = Clock()
    store = ImageStore(max_bytes=1000, max_images=10, ttl_s=60, clock=clock)
    a = store.put(b"a" * 10, "image/png")
    clock.now = 30
    b = store.put(b"b" * 20, "image/jpeg")
    assert store.get(a) == (b"a" * 10, "image/png", 30)
    assert store.get(b) == (b"b" * 20, "image/jpeg", 60)
    assert store.get("nope") is None
    clock.now = 60  # a expires
    assert store.get(a) is None and store.get(b) is not None
    assert store.stats()["images"] == 1 and store.stats()["bytes"] == 20
    clock.now = 90
    assert store.get(b) is None and store.stats() == {"images": 0, "bytes": 0, "max_images": 10, "max_bytes": 1000,
                                                       "ttl_s": 60}
    assert len({store.put(b"x", "image/png") for _ in range(5)}) == 5  # fresh ids
    assert len(a) >= 32  # unguessable


def test_store_bounds_drop_the_oldest_first(caplog):
    store = ImageStore(max_bytes=100, max_images=3, ttl_s=60, clock=Clock())
    ids = [store.put(bytes([i]) * 10, "image/png") for i in range(4)]  # a fourth image: over the count
    assert store.get(ids[0]) is None and all(store.get(i) for i in ids[1:])
    big = store.put(b"z" * 85, "image/png")  # 3 x 10 + 85 > 100: the two oldest make room
    assert [store.get(i) is not None for i in ids[1:]] == [False, False, True]
    assert store.stats()["bytes"] == 95 and store.get(big)[0] == b"z" * 85
    assert "dropped before they expired" in caplog.text
    with pytest.raises(InvalidRequest, match="larger than the URL store"):
        store.put(b"y" * 101, "image/png")


def task(**fields):
    return parse({"prompt": "a fox", **fields}, ImageGenerationRequest).to_task(Limits())[0]


def test_quality_maps_to_steps():
    assert task().params.num_timesteps == 50 and task(quality="auto").params.num_timesteps == 50
    assert [task(quality=q).params.num_timesteps for q in ("low", "medium", "high", "xhigh", "max")] == [
        20, 30, 50, 75, 100]
    assert task(quality="standard").params.num_timesteps == 50 and task(quality="hd").params.num_timesteps == 75
    assert task(quality="low", num_timesteps=20).params.num_timesteps == 20  # agreeing is fine
    assert task(quality="auto", num_timesteps=7).params.num_timesteps == 7
    with pytest.raises(InvalidRequest, match="quality 'low' means num_timesteps 20, but num_timesteps is 30"):
        task(quality="low", num_timesteps=30)
    with pytest.raises(InvalidRequest, match="max_num_timesteps 60"):
        ImageGenerationRequest(prompt="x", quality="max").to_task(Limits(max_num_timesteps=60))
    assert ImageGenerationRequest(prompt="x", quality="hd").quality_name == "xhigh"
    assert ImageGenerationRequest(prompt="x").quality_name == "auto"


def test_response_fields_become_the_task():
    t = task(size="auto", output_format="webp", output_compression=40, partial_images=2, stream=True, user="u1")
    assert (t.params.width, t.params.height) == (None, None)  # the model's default size
    assert t.output == OutputFormat("webp", 40) and t.previews == 2
    assert task(partial_images=2).previews == 0  # previews only go out on a stream
    with pytest.raises(InvalidRequest, match="'url' cannot be streamed"):
        task(response_format="url", stream=True)
    with pytest.raises(InvalidRequest, match="png is lossless"):
        task(output_compression=5)
    assert task(output_compression=100).output == OutputFormat("png", 100)  # OpenAI's default: accepted
