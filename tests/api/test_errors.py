"""The one mapping from errors to HTTP: every error class has its status, and contexts never mutate errors."""

from __future__ import annotations

import inspect

import pytest

import prompt_store.errors as store_errors
import server.api.errors as api_errors
import server.engine.errors as engine_errors
from server.api.errors import HTTP_ERRORS, ErrorContext, ErrorInContext, describe
from server.engine.errors import InvalidParameter, QueueFull, RequestCancelled, RequestTooLong


def error_classes(module) -> list[type[BaseException]]:
    return [c for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, BaseException) and c.__module__ == module.__name__]


def mapped(cls: type[BaseException]) -> bool:
    return any(c in HTTP_ERRORS for c in cls.__mro__)


@pytest.mark.parametrize("module", [store_errors, engine_errors, api_errors], ids=lambda m: m.__name__)
def test_every_request_error_class_has_a_status(module):
    # Not request errors: startup refusals (ModelNotSupported, InvalidConfig) and the context carrier.
    exempt = {engine_errors.ModelNotSupported, engine_errors.InvalidConfig, api_errors.ErrorInContext}
    assert [c.__name__ for c in error_classes(module) if c not in exempt and not mapped(c)] == []


@pytest.mark.parametrize(("error", "status", "kind"), [
    (store_errors.UnknownTask("no task 'x'"), 404, "not_found_error"),
    (store_errors.InvalidTaskName("bad name"), 422, "invalid_request_error"),
    (store_errors.BodyTooLarge("too big"), 413, "invalid_request_error"),
    (store_errors.WidthMismatch("wrong width"), 422, "invalid_request_error"),
    (store_errors.StorageFull("full", cause=OSError(28, "No space left on device")), 507, "storage_error"),
    (store_errors.StorageUnavailable("ro", cause=OSError(30, "Read-only file system")), 503, "storage_error"),
    (InvalidParameter("top_p", "a number in (0, 1]", 2.0), 422, "invalid_request_error"),
    (QueueFull(3), 503, "overloaded_error"),
    (engine_errors.EngineStopped(), 503, "overloaded_error"),
    (RequestCancelled(), 499, "invalid_request_error"),
    (engine_errors.RequestFailed("the model failed"), 500, "server_error"),
    (api_errors.Unauthorized("api"), 401, "authentication_error"),
    (api_errors.RequestBodyTooLarge(10, 11, exact=True), 413, "invalid_request_error"),
])
def test_statuses_and_types(error, status, kind):
    got_status, body, _ = describe(error)
    assert (got_status, body["error"]["type"]) == (status, kind)
    assert body["error"]["message"]


def test_overload_answers_say_when_to_retry():
    assert describe(QueueFull(3))[2]["Retry-After"] == "1"
    assert describe(engine_errors.EngineStopped())[2]["Retry-After"] == "5"
    assert describe(api_errors.Unauthorized("admin"))[2]["WWW-Authenticate"] == "Bearer"


def test_a_context_renames_and_prefixes_without_touching_the_error():
    error = InvalidParameter("text", "a text that gives at least one token", "")
    context = ErrorContext(prefix="requests[2]", rename={"text": "prompt"})
    _, body, _ = describe(ErrorInContext(error, context))
    assert body["error"]["param"] == "requests[2].prompt"
    assert body["error"]["message"] == "requests[2]: prompt must be a text that gives at least one token, got ''"
    assert error.param == "text" and error.message.startswith("text must be")  # the error itself is unchanged
    assert describe(error)[1]["error"]["param"] == "text"


def test_a_context_hint_is_added_for_the_renamed_param():
    error = store_errors.UnknownTask("no task named 'nope'", param="task")
    context = ErrorContext(rename={"task": "model"}, hints={"model": "`model` is a task name or 'base'"})
    _, body, _ = describe(ErrorInContext(error, context))
    assert body["error"] == {"type": "not_found_error", "param": "model",
                             "message": "no task named 'nope'; `model` is a task name or 'base'"}


def test_a_hint_after_a_suggestion_is_a_sentence_of_its_own():
    error = store_errors.UnknownTask("unknown task 'sentimnt'; did you mean 'sentiment'?")
    context = ErrorContext(rename={"task": "model"}, hints={"model": "`model` is a task name or 'base'"})
    _, body, _ = describe(ErrorInContext(error, context))
    message = body["error"]["message"]
    assert message == "unknown task 'sentimnt'; did you mean 'sentiment'? `model` is a task name or 'base'"


def test_an_error_without_param_gets_the_entry_it_came_from():
    _, body, _ = describe(ErrorInContext(RequestTooLong(10, 12, "detail", param="max_new_tokens"),
                                         ErrorContext(prefix="requests[0]")))
    assert body["error"]["param"] == "requests[0].max_new_tokens"
    _, body, _ = describe(ErrorInContext(engine_errors.RequestFailed("boom"), ErrorContext(prefix="prompt[1]")))
    assert body["error"]["param"] == "prompt[1]" and body["error"]["message"] == "prompt[1]: boom"


def test_unexpected_errors_hide_their_details():
    status, body, _ = describe(RuntimeError("secret internals"))
    assert status == 500 and "secret" not in body["error"]["message"]
