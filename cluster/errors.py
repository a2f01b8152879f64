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


class Unavailable(RetryLater):
    """The service cannot serve the request now: it is starting (building and warming up its
    workers), or a worker it needs failed or is being replaced."""


class StageFailed(Unavailable):
    """A MoT stage worker failed while serving the request (or the stage workers are being replaced)."""


class DeploymentFailed(Unavailable):
    """The encoder or decoder deployment (`component`) failed; Serve restarts it, the stage
    workers stay as they are."""

    def __init__(self, message: str, component: str = "", retry_after_s: int | None = None):
        super().__init__(message, retry_after_s)
        self.component = component


class Cancelled(BagelError):
    """The client went away or the request was cancelled."""


class DeadlineExceeded(BagelError):
    """The request ran past the service's per-request time limit."""


class Unauthorized(BagelError):
    """The API key is missing or wrong."""


class PayloadTooLarge(InvalidRequest):
    """The request body is larger than the limits allow (checked before it is read)."""


# exception class -> (HTTP status, OpenAI error type, outcome label of the request metrics)
STATUS: dict[type[Exception], tuple[int, str, str]] = {
    PayloadTooLarge: (413, "invalid_request_error", "invalid"),
    InvalidRequest: (400, "invalid_request_error", "invalid"),
    Overloaded: (429, "rate_limit_error", "overloaded"),
    Cancelled: (499, "cancelled", "cancelled"),
    Unavailable: (503, "service_unavailable", "unavailable"),
    DeadlineExceeded: (504, "timeout", "timeout"),
    Unauthorized: (401, "authentication_error", "unauthorized"),
    CheckpointError: (500, "server_error", "error"),
}


def _row(error: BaseException) -> tuple[int, str, str]:
    for cls, value in STATUS.items():
        if isinstance(error, cls):
            return value
    return 500, "server_error", "error"


def status_of(error: Exception) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of an exception."""
    return _row(error)[:2]


def outcome_of(error: BaseException | None) -> str:
    """How a request ended, for the metrics: "ok", or its error's outcome label."""
    return "ok" if error is None else _row(error)[2]


def describe(error: BaseException) -> str:
    """'Type: first line of the message', for logs and error messages."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
