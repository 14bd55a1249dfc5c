"""Domain errors of the engine and service. The HTTP layer maps each to a status in one place.

Every message names the expected and the actual value, so a client can fix its request.
"""

from __future__ import annotations


class PromptswapError(Exception):
    """Base of the errors a client can cause. `param` names the offending field, when one does."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidParameter(PromptswapError):
    """A sampling or request parameter outside its allowed range."""

    status_code = 422

    def __init__(self, param: str, expected: str, actual: object) -> None:
        super().__init__(f"{param} must be {expected}, got {actual!r}", param=param)
        self.expected = expected
        self.actual = actual


class RequestTooLong(PromptswapError):
    """Virtual tokens + text + max_new_tokens exceed what the model's context (or the KV budget) allows."""

    status_code = 422

    def __init__(self, limit: int, actual: int, detail: str, param: str = "text") -> None:
        super().__init__(
            f"request needs {actual} positions ({detail}) but at most {limit} are allowed", param=param
        )
        self.limit = limit
        self.actual = actual


class QueueFull(PromptswapError):
    """The waiting queue is at its configured limit; the client should retry later."""

    status_code = 503
    error_type = "overloaded_error"

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        super().__init__(f"the request queue is full ({limit} waiting); retry later")
        self.limit = limit
        self.retry_after_s = retry_after_s


class EngineStopped(PromptswapError):
    """The engine is shutting down and accepts no new requests."""

    status_code = 503
    error_type = "overloaded_error"
    retry_after_s = 5

    def __init__(self) -> None:
        super().__init__("the server is shutting down and accepts no new requests")


class RequestCancelled(PromptswapError):
    """The request was cancelled (its client went away) before it finished."""

    status_code = 499

    def __init__(self) -> None:
        super().__init__("the request was cancelled")


class RequestFailed(PromptswapError):
    """The engine failed on this request alone; the other requests went on."""

    status_code = 500
    error_type = "server_error"


class ModelNotSupported(Exception):
    """The base model cannot be served (encoder-decoder, no KV cache, unsupported attention)."""
