"""The engine's errors: what a caller can get wrong, and how a request can end without a result.

No HTTP here: `server/api/errors.py` maps each class to a status in one table. Every message
names the expected and the actual value, so a client can fix its request.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of the errors a request can end with. `param` names the offending field, when one does."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidParameter(EngineError):
    """A sampling or request parameter outside its allowed range."""

    def __init__(self, param: str, expected: str, actual: object) -> None:
        super().__init__(f"{param} must be {expected}, got {actual!r}", param=param)
        self.expected = expected
        self.actual = actual


class RequestTooLong(EngineError):
    """Virtual tokens + text + max_new_tokens exceed what the model's context (or the KV budget) allows."""

    def __init__(self, limit: int, actual: int, detail: str, param: str = "text") -> None:
        super().__init__(f"request needs {actual} positions ({detail}) but at most {limit} are allowed", param=param)
        self.limit = limit
        self.actual = actual


class QueueFull(EngineError):
    """max_running requests run and max_queue more wait; the client should retry later."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request queue is full ({limit} waiting); retry later")
        self.limit = limit


class EngineStopped(EngineError):
    """The engine is shutting down: it accepts no new request, and ends the ones still running."""

    def __init__(self, message: str = "the server is shutting down and accepts no new requests") -> None:
        super().__init__(message)


class RequestCancelled(EngineError):
    """The caller cancelled the request (its client went away) before it finished."""

    def __init__(self) -> None:
        super().__init__("the request was cancelled: the client closed the connection")


class RequestFailed(EngineError):
    """The engine failed on this request alone; the other requests went on."""


class InvalidConfig(ValueError):
    """An engine setting outside its allowed range; `field` names the setting."""

    def __init__(self, field: str, expected: str, actual: object) -> None:
        super().__init__(f"{field} must be {expected}, got {actual!r}")
        self.field = field
        self.expected = expected
        self.actual = actual


def check_int(field: str, value: object, *, low: int, optional: bool = False) -> None:
    """Raise InvalidConfig unless `value` is an integer >= `low` (or None, when `optional`)."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InvalidConfig(field, f"an integer >= {low}{' or unset' if optional else ''}", value)


def check_encodable(text: str, param: str = "text") -> None:
    """A lone UTF-16 surrogate (e.g. JSON's "\\ud800") is a valid Python str but no text a tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameter(param, "text that can be encoded as UTF-8 (no lone surrogate code points)",
                               f"{exc.object[exc.start:exc.end]!r} at character {exc.start}") from None


class ModelNotSupported(Exception):
    """The base model cannot be served (encoder-decoder, no KV cache, unsupported attention)."""
