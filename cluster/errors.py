"""One table from exception to HTTP status and OpenAI error type."""
from __future__ import annotations

from bagel_model.errors import BagelError, CheckpointError, InvalidRequest


class Overloaded(BagelError):
    """Too many requests in flight and queued: retry later."""


class Cancelled(BagelError):
    """The client went away or the request was cancelled."""


class StageFailed(BagelError):
    """A worker process failed while serving the request (or the workers are being replaced)."""


class DeadlineExceeded(BagelError):
    """The request ran past the service's per-request time limit."""


class Unauthorized(BagelError):
    """The API key is missing or wrong."""


# exception class -> (HTTP status, OpenAI error type)
STATUS: dict[type[Exception], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    Overloaded: (429, "rate_limit_error"),
    Cancelled: (499, "cancelled"),
    StageFailed: (503, "service_unavailable"),
    DeadlineExceeded: (504, "timeout"),
    Unauthorized: (401, "authentication_error"),
    CheckpointError: (500, "server_error"),
}


def status_of(error: Exception) -> tuple[int, str]:
    for cls, value in STATUS.items():
        if isinstance(error, cls):
            return value
    return 500, "server_error"


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
