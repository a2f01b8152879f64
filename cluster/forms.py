"""The image-edit request's fields from its accepted bodies: JSON, or an OpenAI-style form
(multipart, or URL-encoded). Every `image` / `image[]` part is kept, in order (several images
are BAGEL's context); other form strings stay strings, typed by the request model like JSON
values (so `think=banana` is refused as JSON's `"think": "banana"` is).

Every file part counts against the image limits (count and bytes). Reading the form stays on the
event loop (it only moves bytes); `json_fields` (base64) runs off it with the rest of the parsing.
"""
from __future__ import annotations

import base64

from fastapi import Request

from bagel_model.errors import InvalidRequest

from .args import Limits
from .bodies import is_json, media_type, read_json

FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")
FILE_FIELDS = ("image",)  # form fields that may carry files
MAX_FORM_FIELDS = 64


async def edit_fields(request: Request, limits: Limits) -> dict:
    """The body's fields: a JSON object, or the form's fields (image files as bytes)."""
    if media_type(request) in FORMS:
        return await _form_fields(request, limits)
    if not is_json(request):
        raise InvalidRequest("send the body as multipart/form-data, or as JSON with 'content-type: application/json'")
    return await read_json(request)


def json_fields(fields: dict) -> dict:
    """The fields with uploaded files as base64 text, as a JSON body carries them."""
    return {k: [_b64(v) for v in value] if isinstance(value, list) else _b64(value) for k, value in fields.items()}


async def _form_fields(request: Request, limits: Limits) -> dict:
    form = await request.form(max_files=limits.max_images, max_fields=MAX_FORM_FIELDS)
    fields: dict = {}
    for key, value in form.multi_items():
        name = key.removesuffix("[]")
        if hasattr(value, "read"):
            if name not in FILE_FIELDS:
                raise InvalidRequest(f"{name}: expected a text field, got a file", param=name)
            data = await value.read(limits.max_upload_bytes + 1)
            if len(data) > limits.max_upload_bytes:
                raise InvalidRequest(f"{name}: larger than {limits.max_upload_bytes} bytes", param=name)
            value = data
        if name in FILE_FIELDS:
            fields.setdefault(name, []).append(value)
        elif name in fields:
            raise InvalidRequest(f"{name}: given more than once", param=name)
        else:
            fields[name] = value
    if isinstance(fields.get("cfg_interval"), str):
        fields["cfg_interval"] = _number_list(fields["cfg_interval"])
    return fields


def _number_list(text: str) -> list[str]:
    """'0.4,1' or '[0.4, 1]' -> ['0.4', '1'] (the model converts each, or names the bad one)."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [v.strip() for v in text.split(",")]


def _b64(value):
    return base64.b64encode(value).decode() if isinstance(value, bytes) else value
