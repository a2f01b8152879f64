"""Typed errors shared by every layer of bagel-serve.

`BagelError` is the root; the service maps each subclass to one HTTP status (cluster/errors.py).
"""


class BagelError(Exception):
    """Base class of every error bagel-serve raises on purpose."""


class CheckpointError(BagelError):
    """A checkpoint folder is missing, incomplete, corrupt or does not fit the configuration."""


class InvalidRequest(BagelError, ValueError):
    """A request (or its parameters, images or text) is outside what the model supports.

    `param` names the offending field(s), comma-separated, for OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
