"""Input checks before any work, without Ray: images judged from their headers (a bomb costs
nothing to refuse), handle-caller items checked like HTTP ones, the decoded-image memory budget
of admission, and the HTTP boundary (API key before the body, body size, JSON parsed with a
nesting limit) on a stub service."""
from __future__ import annotations

import asyncio
import time
import tracemalloc

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bagel_model.errors import InvalidRequest
from bagel_model.transforms import InvalidImage
from cluster.admission import Admission
from cluster.args import AppArgs, Limits
from cluster.http import create_app
from cluster.inputs import BYTES_PER_PIXEL, EncodedImage, checked_items, decoded, decoded_bytes, inspect_image

from . import hostile

LIMITS = Limits(max_image_pixels=40_000_000)


def test_a_bomb_is_refused_from_its_header_without_decoding():
    bomb = hostile.png_header_only(10**5, 10**5)  # 10 gigapixels declared in ~80 bytes
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(InvalidImage, match="image: larger than the limit of 40000000 pixels"):
        inspect_image(bomb, LIMITS)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - start < 0.5 and peak < 10 * 2**20


def test_an_allowed_image_is_inspected_not_decoded():
    data = hostile.png(6000, 6000, "RGB")
    tracemalloc.start()
    image = inspect_image(data, LIMITS)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert image.size == (6000, 6000) and peak < 10 * 2**20, "36 MP decoded (144 MB) would show here"
    assert decoded_bytes([image, "text"]) == 36_000_000 * BYTES_PER_PIXEL
    [pixels] = decoded([image])
    assert pixels.size == (6000, 6000) and pixels.getpixel((0, 0)) == (20, 40, 60)


@pytest.mark.parametrize("data,words", [
    (b"hello", "not a decodable image (PNG, JPEG, WEBP, GIF, BMP)"),
    (hostile.tiff(), "not a decodable image"),
    (hostile.png(7000, 6000), "7000x6000 = 42000000 pixels, over the limit of 40000000"),
    (hostile.png(2000, 10), "aspect ratio 2000x10 exceeds 16.0:1"),
    (b"\x00" * (LIMITS.max_upload_bytes + 1), "larger than"),
])
def test_bad_images_are_named_and_say_why(data, words):
    with pytest.raises(InvalidImage) as info:
        inspect_image(data, LIMITS, "messages[0].image_url")
    assert str(info.value).startswith("messages[0].image_url: ") and words in str(info.value)


def test_truncated_pixels_fail_when_decoded_as_invalid_image():
    image = inspect_image(hostile.png(64, 64, "RGB", truncate=70), LIMITS)
    with pytest.raises(InvalidImage, match="could not be decoded"):
        decoded([image])


def test_handle_items_are_checked_like_http_ones():
    limits = Limits(max_images=2, max_image_pixels=10_000, max_request_image_pixels=15_000)
    png = hostile.png(100, 100)
    items = checked_items([png, "what?"], limits)
    assert isinstance(items[0], EncodedImage) and items[0].size == (100, 100) and items[1] == "what?"
    with pytest.raises(InvalidRequest, match="item 0: not valid Unicode"):
        checked_items(["x \ud800 y"], limits)
    with pytest.raises(InvalidRequest, match="at most 2 images per request, got 3"):
        checked_items([png] * 3 + ["?"], limits)
    with pytest.raises(InvalidRequest, match="20000 pixels together; at most 15000"):
        checked_items([png, Image.new("RGB", (100, 100)), "?"], limits)
    with pytest.raises(InvalidImage, match="item 1: 101x100 = 10100 pixels"):
        checked_items(["?", Image.new("RGB", (101, 100))], limits)
    with pytest.raises(InvalidRequest, match="item 0: expected text"):
        checked_items([3.5], limits)


def test_decoded_image_budget_queues_requests_and_refuses_what_never_fits():
    async def scenario() -> list[str]:
        admission = Admission(4, 4, None, retry_after_s=1, image_budget_bytes=100)
        never = asyncio.get_running_loop().create_future()  # not cancelled
        with pytest.raises(InvalidRequest, match="images need ~101 bytes decoded"):
            admission.enter(0, 101)
        order = []
        admission.enter(0, 70)
        await admission.reserve(0, 70, never)

        async def second() -> None:
            admission.enter(0, 60)
            await admission.reserve(0, 60, never)
            order.append("second admitted")

        waiting = asyncio.ensure_future(second())
        await asyncio.sleep(0.05)
        order.append("first leaves")
        assert admission.image_reserved == 70 and admission.in_system == 2
        admission.leave(0, 70)
        await waiting
        assert admission.image_reserved == 60
        admission.leave(0, 60)
        assert (admission.image_reserved, admission.in_system) == (0, 0)
        return order

    assert asyncio.run(scenario()) == ["first leaves", "second admitted"]


class Stub:
    """A service that must never be reached: the boundary answers first."""

    def __init__(self, api_key: str | None = None):
        self.args = AppArgs(api_key=api_key, limits={"max_upload_bytes": 1000, "max_images": 1})
        self.limits = self.args.limits
        self.model_name = "stub"

    async def start_images(self, task, n):
        raise AssertionError("reached the service")

    start_text = start_images


def test_the_key_is_checked_before_the_body_is_read():
    client = TestClient(create_app(lambda: Stub(api_key="k")))
    for path in (hostile.GEN, hostile.EDIT, hostile.CHAT):
        r = client.post(path, content=b"{oops", headers=hostile.JSON)
        assert r.status_code == 401, r.text
        r = client.post(path, content=b"{oops", headers={**hostile.JSON, "Authorization": "Bearer k"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_body_size_and_json_nesting_are_limited_at_the_boundary():
    client = TestClient(create_app(lambda: Stub()), raise_server_exceptions=False)
    limit = Stub().limits.max_body_bytes
    assert limit == 1000 * 4 // 3 + 4 + 2**20
    r = client.post(hostile.GEN, content=b" " * (limit + 1), headers=hostile.JSON)
    assert r.status_code == 413 and f"at most {limit}" in r.json()["error"]["message"]
    r = client.post(hostile.EDIT, content=b"[" * 100_000 + b"]" * 100_000, headers=hostile.JSON)
    assert r.status_code == 400 and "recursion limit" in r.json()["error"]["message"]
    nan = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    r = client.post(hostile.CHAT, content=nan, headers=hostile.JSON)
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
