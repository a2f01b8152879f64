"""The service's typed errors, and one table from exception to HTTP status and OpenAI error type."""
from __future__ import annotations

from bagel_model.errors import BagelError, CheckpointError, InvalidRequest


class RetryLater(BagelError):
    """The service cannot take the request now; the client may retry after `retry_after_s`
    seconds (HTTP Retry-After; None: no advice)."""

    def __init__(self, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(RetryLater):
    """Too many requests in flight and queued."""


class StageFailed(RetryLater):
    """A worker process failed while serving the request (or the workers are being replaced)."""


class Cancelled(BagelError):
    """The client went away or the request was cancelled."""


class DeadlineExceeded(BagelError):
    """The request ran past the service's per-request time limit."""


class Unauthorized(BagelError):
    """The API key is missing or wrong."""


class PayloadTooLarge(InvalidRequest):
    """The request body is larger than the limits allow (checked before it is read)."""


# exception class -> (HTTP status, OpenAI error type)
STATUS: dict[type[Exception], tuple[int, str]] = {
    PayloadTooLarge: (413, "invalid_request_error"),
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


def describe(error: BaseException) -> str:
    """'Type: first line of the message', for logs and error messages."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
