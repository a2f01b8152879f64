"""Hand-written hostile requests, each with the answer it must get (tests/test_hostile.py).

Every known way a request broke the service, and the classic attacks on an image API:
malformed and deeply nested JSON, lone surrogates, invalid UTF-8, NaN and infinities, huge
numbers, multipart edge cases, undecodable, truncated, polyglot and unsupported images, and
decompression bombs that declare billions of pixels in a few hundred bytes.
"""
from __future__ import annotations

import base64
import io
import itertools
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image

GEN, EDIT, CHAT = "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"
JSON = {"content-type": "application/json"}
# What an error message must never show: object addresses, tracebacks, Pillow's own bomb limit.
LEAKS = ("0x7f", "object at", "BytesIO", "Traceback", "DecompressionBomb", "178956970")


@dataclass
class Case:
    name: str
    path: str
    request: dict  # httpx keyword arguments (json / content / data / files / headers)
    status: int
    words: list[str] = field(default_factory=list)  # the error message names these
    auth: bool = True
    raw: bool = False  # sent by http.client, which sends headers as they are (a Content-Length that lies)


def png(width: int, height: int, mode: str = "L", truncate: int | None = None) -> bytes:
    """A real PNG (flat images compress to almost nothing however many pixels they have)."""
    buf = io.BytesIO()
    Image.new(mode, (width, height), 0 if mode in ("L", "1") else (20, 40, 60)).save(buf, format="PNG")
    data = buf.getvalue()
    return data[:truncate] if truncate else data


def png_header_only(width: int, height: int) -> bytes:
    """A decompression bomb's header: a PNG declaring `width` x `height` pixels in ~60 bytes."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def png_zip_polyglot() -> bytes:
    """A valid PNG that is also a valid ZIP archive (the archive appended)."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("payload.html", "<script>alert(1)</script>")
    return png(32, 32, "RGB") + archive.getvalue()


def tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="TIFF")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


def chat(content, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def with_images(*images: bytes) -> list[dict]:
    return [{"type": "text", "text": "what is this?"}] + [
        {"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]


def form(image: bytes | None = None, **fields) -> dict:
    """Multipart edit: `image` as a file part, the fields as text parts."""
    files = [("image", ("in.png", image, "image/png"))] if image is not None else []
    return {"data": {"prompt": "make it blue", "num_timesteps": "2", **fields}, "files": files}


def cases(max_image_pixels: int, max_upload_bytes: int, max_body_bytes: int) -> Iterator[Case]:
    deep = b"[" * 100_000 + b"]" * 100_000
    big = png(6000, 6000, "RGB")  # 36 MP in ~105 KB
    small = png(32, 32, "RGB")

    # -- JSON bodies ---------------------------------------------------------------------
    for path, body in ((CHAT, rb'{"messages":[{"role":"user","content":"x \ud800 y"}],"max_tokens":2}'),
                       (GEN, rb'{"prompt":"x \udfff y","num_timesteps":2}'),
                       (EDIT, rb'{"prompt":"x \ud800","image":"AAAA"}')):
        yield Case(f"lone surrogate {path}", path, {"content": body, "headers": JSON}, 400, ["not valid JSON", "column"])
    for path in (GEN, EDIT, CHAT):
        yield Case(f"100000-level nesting {path}", path, {"content": deep, "headers": JSON}, 400, ["JSON", "recursion"])
        yield Case(f"invalid UTF-8 {path}", path, {"content": b'{"prompt": "\xff\xfe\xfa"}', "headers": JSON},
                   400, ["JSON", "unicode"])
        yield Case(f"empty body {path}", path, {"content": b"", "headers": JSON}, 400, ["empty"])
        yield Case(f"JSON null {path}", path, {"content": b"null", "headers": JSON}, 400, ["JSON object", "null"])
        yield Case(f"JSON array {path}", path, {"content": b"[1, 2]", "headers": JSON}, 400, ["JSON object"])
        yield Case(f"truncated JSON {path}", path, {"content": b'{"prompt": "a', "headers": JSON}, 400, ["JSON", "line 1"])
        yield Case(f"malformed JSON without the API key {path}", path, {"content": b"{oops", "headers": JSON}, 401,
                   ["API key"], auth=False)
        yield Case(f"declared body too large {path}", path,  # sent as declared, by http.client
                   {"content": b"{}", "headers": {**JSON, "Content-Length": str(max_body_bytes + 1)}}, 413, ["bytes"],
                   raw=True)
    yield Case("text/plain body", GEN, {"content": b'{"prompt": "a"}', "headers": {"content-type": "text/plain"}},
               400, ["content-type"])
    yield Case("nesting inside a field", GEN, {"content": b'{"prompt": ' + b"[" * 150 + b"]" * 150 + b"}",
                                               "headers": JSON}, 400, ["prompt"])
    yield Case("NaN temperature", CHAT, {"content": b'{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
                                         "headers": JSON}, 400, ["temperature", "finite"])
    yield Case("Infinity guidance", GEN, {"content": b'{"prompt":"a","cfg_text_scale":Infinity}', "headers": JSON},
               400, ["cfg_text_scale", "finite"])
    yield Case("-Infinity shift", GEN, {"content": b'{"prompt":"a","timestep_shift":-Infinity}', "headers": JSON},
               400, ["timestep_shift", "finite"])
    yield Case("1e999 overflows to infinity", GEN, {"content": b'{"prompt":"a","cfg_img_scale":1e999}', "headers": JSON},
               400, ["cfg_img_scale", "finite"])
    yield Case("5000-digit integer", GEN, {"content": b'{"prompt":"a","n":' + b"9" * 5000 + b"}", "headers": JSON},
               400, ["JSON", "number"])
    yield Case("huge seed", GEN, {"json": {"prompt": "a", "seed": 10**30}}, 400, ["seed"])
    yield Case("huge n", GEN, {"json": {"prompt": "a", "n": 10**30}}, 400, ["n must be at most"])
    yield Case("1e308 steps", GEN, {"json": {"prompt": "a", "num_timesteps": 1e308}}, 400, ["num_timesteps"])
    yield Case("20-digit size", GEN, {"json": {"prompt": "a", "size": "99999999999999999999x64"}}, 400, ["width"])
    yield Case("huge max_tokens", CHAT, {"json": chat("hi", max_tokens=10**40)}, 400, ["max_tokens"])
    yield Case("wrong type in a nested part", CHAT, {"json": chat([{"type": "text", "text": ["a"]}])}, 400,
               ["messages.0.content"])

    # -- multipart edits -----------------------------------------------------------------
    for value in ("abc", "", "[abc", "[1,", "[" * 100_000, "[[0.1, 0.2]]", "0.1,0.2,0.3", "nan,1"):
        yield Case(f"multipart cfg_interval={value[:12]!r}", EDIT, form(small, cfg_interval=value), 400, ["cfg_interval"])
    yield Case("multipart think=banana", EDIT, form(small, think="banana"), 400, ["think", "boolean"])
    yield Case("multipart stream=maybe", EDIT, form(small, stream="maybe"), 400, ["stream", "boolean"])
    yield Case("multipart n=two", EDIT, form(small, n="two"), 400, ["n", "integer"])
    yield Case("multipart without image", EDIT, form(None), 400, ["image"])
    yield Case("multipart prompt as a file", EDIT,
               {"data": {"num_timesteps": "2"}, "files": [("image", ("a.png", small, "image/png")),
                                                          ("prompt", ("p.txt", b"make it blue", "text/plain"))]},
               400, ["prompt", "file"])
    yield Case("multipart prompt twice", EDIT, {"data": {"prompt": ["a", "b"]},
                                                "files": [("image", ("a.png", small, "image/png"))]},
               400, ["prompt", "more than once"])
    yield Case("multipart five image parts", EDIT,
               {"data": {"prompt": "a"}, "files": [("image[]", (f"{i}.png", small, "image/png")) for i in range(5)]},
               400, ["files"])
    yield Case("multipart second image part too large", EDIT,
               {"data": {"prompt": "a"}, "files": [("image[]", ("a.png", small, "image/png")),
                                                   ("image[]", ("b.png", b"\x00" * (max_upload_bytes + 1), "image/png"))]},
               400, ["image", "larger than"])
    yield Case("multipart bomb in the second image part", EDIT,
               {"data": {"prompt": "a"}, "files": [("image[]", ("a.png", small, "image/png")),
                                                   ("image[]", ("b.png", png_header_only(10**5, 10**5), "image/png"))]},
               400, ["image"])
    part = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    yield Case("chunked body over the limit", EDIT,  # no Content-Length: refused as the bytes arrive
               {"content": itertools.chain([part], (b"x" * 2**20 for _ in range(max_body_bytes // 2**20 + 2))),
                "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 413, ["at most", "bytes"])

    # -- images --------------------------------------------------------------------------
    def edit_json(image: bytes, **extra) -> dict:
        return {"json": {"prompt": "make it blue", "image": b64(image), "num_timesteps": 2, **extra}}

    yield Case("not an image", EDIT, edit_json(b"hello, world"), 400, ["image", "not a decodable image"])
    yield Case("empty file", EDIT, form(b""), 400, ["image"])
    yield Case("EPS (would run Ghostscript)", EDIT, edit_json(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"),
               400, ["not a decodable image", "PNG"])
    yield Case("TIFF (not an accepted format)", EDIT, edit_json(tiff()), 400, ["not a decodable image"])
    yield Case("truncated PNG", EDIT, edit_json(png(64, 64, "RGB", truncate=70)), 400, ["could not be decoded"])
    yield Case("PNG signature only", EDIT, edit_json(b"\x89PNG\r\n\x1a\n"), 400, ["not a decodable image"])
    yield Case("bomb: 10 gigapixels declared", EDIT, edit_json(png_header_only(10**5, 10**5)), 400,
               ["image", str(max_image_pixels)])
    yield Case("bomb beyond Pillow's own limit", CHAT, {"json": chat(with_images(png_header_only(20_000, 10_000)))},
               400, ["image_url", str(max_image_pixels)])
    yield Case("just over the pixel limit", EDIT, edit_json(png(7000, 6000)), 400, [str(max_image_pixels)])
    yield Case("zero-width image", EDIT, edit_json(png_header_only(0, 64)), 400, ["image"])
    yield Case("aspect ratio", EDIT, edit_json(png(2000, 10)), 400, ["aspect ratio"])
    yield Case("bad base64", EDIT, {"json": {"prompt": "a", "image": "@@@@"}}, 400, ["image", "base64"])
    yield Case("image too many bytes", EDIT, {"json": {"prompt": "a", "image": "A" * (max_upload_bytes * 2)}},
               400, ["image", "larger than"])
    yield Case("http image URL", CHAT, {"json": chat([{"type": "text", "text": "hi"},
                                                      {"type": "image_url", "image_url": {"url": "http://x/a.png"}}])},
               400, ["data URL"])
    yield Case("20 images of 36 MP", CHAT, {"json": chat(with_images(*[big] * 20))}, 400, ["at most 4 images"])
    yield Case("3 images of 36 MP: over the per-request pixels", CHAT, {"json": chat(with_images(*[big] * 3))},
               400, ["pixels"])
    yield Case("PNG + ZIP polyglot is just a PNG", EDIT, edit_json(png_zip_polyglot()), 200)
