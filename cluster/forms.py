"""The image-edit request from its two accepted bodies: JSON (`ImageEditRequest`), or an
OpenAI-style multipart form (files become base64 fields; form strings become typed values).
Every `image` / `image[]` part is kept, in order (several images are BAGEL's context)."""
from __future__ import annotations

import base64
import json

from fastapi import Request

from bagel_model.errors import InvalidRequest

from .normalize import parse
from .protocol import ImageEditRequest

FLAGS = ("think", "stream")  # booleans, sent as "true"/"1"/"yes" in a form


async def edit_request(request: Request, max_upload_bytes: int) -> ImageEditRequest:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        fields = await _form_fields(request, max_upload_bytes)
    else:
        try:
            fields = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidRequest("the body must be JSON or multipart/form-data") from None
    return parse(fields, ImageEditRequest)


async def _form_fields(request: Request, max_upload_bytes: int) -> dict:
    form = await request.form()
    fields: dict = {}
    for key, value in form.multi_items():
        if hasattr(value, "read"):
            data = await value.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise InvalidRequest(f"{key}: larger than {max_upload_bytes} bytes")
            fields.setdefault(key.removesuffix("[]"), []).append(base64.b64encode(data).decode())
        elif key.removesuffix("[]") == "image":
            fields.setdefault("image", []).append(value)
        else:
            fields[key] = json.loads(value) if key == "cfg_interval" and value.startswith("[") else value
    if isinstance(fields.get("cfg_interval"), str):
        fields["cfg_interval"] = [float(v) for v in fields["cfg_interval"].split(",")]
    for flag in FLAGS:
        if flag in fields:
            fields[flag] = str(fields[flag]).lower() in ("1", "true", "yes")
    return fields
