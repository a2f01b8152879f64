"""The HTTP layer on its own (no Ray): errors in OpenAI's shape with Retry-After from the
exception's field, the response models' JSON, and an OpenAPI document that describes what the
routes accept and return. A stub service stands in for `BagelService`."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from cluster.args import AppArgs
from cluster.errors import Overloaded, RetryLater, StageFailed
from cluster.http import create_app
from cluster.responses import ChatCompletionChunk, ChatDelta, ChunkChoice


class StubService:
    """Refuses every image request with `error`."""

    def __init__(self, error: Exception, api_key: str | None = None):
        self.args = AppArgs(api_key=api_key)
        self.limits = self.args.limits
        self.model_name = "stub"
        self.error = error

    async def start_images(self, task, n):
        raise self.error


GENERATION = {"prompt": "a red fox", "size": "64x64"}


@pytest.mark.parametrize("error,status,retry_after", [
    (Overloaded("server busy", retry_after_s=7), 429, "7"),
    (StageFailed("a worker failed"), 503, None),
    (StageFailed("restarting", retry_after_s=2), 503, "2"),
])
def test_errors_carry_retry_after_from_the_exception(error, status, retry_after):
    client = TestClient(create_app(lambda: StubService(error)))
    r = client.post("/v1/images/generations", json=GENERATION)
    assert r.status_code == status
    assert r.headers.get("retry-after") == retry_after
    assert r.json() == {"error": {"message": str(error), "type": r.json()["error"]["type"], "param": None,
                                  "code": None}}


def test_retry_after_survives_pickling():
    """Handle callers receive the exception pickled by Ray."""
    for error in (Overloaded("busy", retry_after_s=4), StageFailed("restarting", retry_after_s=1), StageFailed("x")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and isinstance(copy, RetryLater)
        assert (str(copy), copy.retry_after_s) == (str(error), error.retry_after_s)


def test_auth_comes_from_the_service():
    client = TestClient(create_app(lambda: StubService(Overloaded("busy"), api_key="k")))
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.get("/v1/models", headers={"Authorization": "Bearer k"})
    assert r.json() == {"object": "list", "data": [{"id": "stub", "object": "model", "created": 0,
                                                    "owned_by": "bagel-serve"}]}


def test_chat_chunk_deltas_hold_only_what_they_add():
    def chunk(delta, finish=None) -> dict:
        return ChatCompletionChunk(id="c", created=1, model="m",
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)]).model_dump(mode="json")

    assert chunk(ChatDelta(role="assistant"))["choices"] == [
        {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]
    assert chunk(ChatDelta(content="Hi"))["choices"][0]["delta"] == {"content": "Hi"}
    assert chunk(ChatDelta(), "stop")["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert chunk(ChatDelta())["object"] == "chat.completion.chunk"


def test_openapi_describes_requests_and_responses():
    doc = TestClient(create_app(lambda: StubService(Overloaded("busy")))).get("/openapi.json").json()
    paths = doc["paths"]
    for path, model in (("/v1/images/generations", "ImagesResponse"), ("/v1/images/edits", "ImagesResponse"),
                        ("/v1/chat/completions", "ChatCompletion"), ("/v1/models", "ModelList")):
        [operation] = paths[path].values()
        assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(model)
        assert operation["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    def request_schema(path: str, content_type: str = "application/json") -> dict:
        ref = paths[path]["post"]["requestBody"]["content"][content_type]["schema"]["$ref"]
        return doc["components"]["schemas"][ref.removeprefix("#/components/schemas/")]

    assert set(paths["/v1/images/edits"]["post"]["requestBody"]["content"]) == {"application/json",
                                                                               "multipart/form-data"}
    assert {"prompt", "image"} <= set(request_schema("/v1/images/edits")["required"])
    assert request_schema("/v1/images/generations")["required"] == ["prompt"]
    chat = request_schema("/v1/chat/completions")
    assert chat["required"] == ["messages"] and {"modalities", "negative_prompt", "stop"} <= set(chat["properties"])
    message = chat["properties"]["messages"]["items"]["$ref"].removeprefix("#/components/schemas/")
    assert "role" in doc["components"]["schemas"][message]["properties"]
