"""What a task carries besides its weights: the text template it was trained with, its answers, and the
generation defaults its requests start from.

A template contains `{text}` exactly once, replaced literally by the request's text: other braces are
plain text (a JSON example in a template stays as it is). `choices` are the answers a classifier task
was trained to give (at most MAX_CHOICES distinct strings), kept as a JSON list in the file's metadata.
`defaults` are sampling parameters only (DEFAULT_KEYS), kept as a JSON object; their ranges are the
engine's (the registry is given that check: prompt_store knows no serving).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from prompt_store.errors import InvalidChoices, InvalidDefaults, InvalidTemplate

PLACEHOLDER = "{text}"
MAX_TEMPLATE_CHARS = 16_384
MAX_CHOICES = 32
MAX_CHOICE_CHARS = 256


def encodable(text: str) -> bool:
    """Whether a string can be written into a file's metadata (UTF-8): a lone surrogate cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_template(template: object) -> str:
    """The template if it is a string with `{text}` exactly once (and not huge); else InvalidTemplate."""
    if not isinstance(template, str):
        raise InvalidTemplate(f"a template must be a string, got {type(template).__name__}",
                              expected="a string containing {text} once", actual=type(template).__name__)
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise InvalidTemplate(f"a template must contain {PLACEHOLDER} exactly once (replaced by the request's text), "
                              f"found it {count} times in {template[:80]!r}",
                              expected=f"{PLACEHOLDER} once", actual=count)
    if not encodable(template):
        raise InvalidTemplate("a template must be valid text (no lone surrogate)", expected="UTF-8 text",
                              actual="a lone surrogate")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise InvalidTemplate(f"a template may have at most {MAX_TEMPLATE_CHARS} characters, got {len(template)}",
                              expected=f"<= {MAX_TEMPLATE_CHARS}", actual=len(template))
    return template


def apply_template(template: str | None, text: str) -> str:
    """The text as the task was trained to see it: `{text}` replaced literally, once."""
    if template is None:
        return text
    before, _, after = template.partition(PLACEHOLDER)
    return before + text + after


def check_choices(choices: Iterable[object]) -> tuple[str, ...]:
    values = list(choices)
    if not 1 <= len(values) <= MAX_CHOICES:
        raise InvalidChoices(f"a task has 1..{MAX_CHOICES} choices, got {len(values)}",
                             expected=f"1..{MAX_CHOICES}", actual=len(values))
    strings: list[str] = []
    for value in values:
        if not isinstance(value, str) or not value or len(value) > MAX_CHOICE_CHARS or not encodable(value):
            raise InvalidChoices(f"each choice must be a non-empty string of at most {MAX_CHOICE_CHARS} characters, "
                                 f"got {str(value)[:40]!r}", expected="a non-empty string", actual=str(value)[:40])
        strings.append(value)
    if len(set(strings)) != len(strings):
        raise InvalidChoices("choices must be distinct", expected="distinct strings", actual=strings)
    return tuple(strings)


def parse_choices(raw: str) -> tuple[str, ...]:
    """Choices as a file's metadata keeps them: a JSON list of strings."""
    try:
        values = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidChoices("the choices metadata must be a JSON list of strings", expected="a JSON list",
                             actual=raw[:40]) from None
    if not isinstance(values, list):
        raise InvalidChoices("the choices metadata must be a JSON list of strings", expected="a JSON list",
                             actual=type(values).__name__)
    return check_choices(values)


def encode_choices(choices: Iterable[str]) -> str:
    return json.dumps(list(choices), ensure_ascii=False)


DEFAULT_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "stop", "seed", "ignore_eos", "logprobs",
                "repetition_penalty", "presence_penalty", "frequency_penalty")


MAX_SYSTEM_CHARS = 8192
MAX_DESCRIPTION_CHARS = 8192


def check_system(system: object) -> str:
    """A task's chat system message (used when a conversation brings none): text of at most MAX_SYSTEM_CHARS."""
    return _check_text("system", system, MAX_SYSTEM_CHARS)


def check_description(description: object) -> str:
    """A task's description (shown by GET /prompts and /v1/models): text of at most MAX_DESCRIPTION_CHARS."""
    return _check_text("description", description, MAX_DESCRIPTION_CHARS)


def _check_text(param: str, value: object, max_chars: int) -> str:
    """A text kept in a task's metadata: a string, valid text (UTF-8 can write it), at most `max_chars` long."""
    if not isinstance(value, str):
        raise InvalidDefaults(f"{param} must be a string, got {type(value).__name__}", param=param,
                              expected="a string", actual=type(value).__name__)
    if not encodable(value):
        raise InvalidDefaults(f"{param} must be valid text (no lone surrogate)", param=param, expected="UTF-8 text",
                              actual="a lone surrogate")
    if len(value) > max_chars:
        raise InvalidDefaults(f"{param} may have at most {max_chars} characters, got {len(value)}",
                              param=param, expected=f"<= {max_chars}", actual=len(value))
    return value


def check_defaults(defaults: object) -> dict[str, Any]:
    """A task's generation defaults: an object of sampling parameters (DEFAULT_KEYS) with JSON scalar values
    (stop: a string or a list of strings). Ranges are checked by the registry's `check_defaults`."""
    if not isinstance(defaults, dict):
        raise InvalidDefaults(f"defaults must be a JSON object, got {type(defaults).__name__}",
                              expected="an object", actual=type(defaults).__name__)
    for key, value in defaults.items():
        if key not in DEFAULT_KEYS:
            raise InvalidDefaults(f"defaults.{key} is not a generation default; they are {', '.join(DEFAULT_KEYS)}",
                                  param=f"defaults.{key}", expected=list(DEFAULT_KEYS), actual=key)
        stop_list = key == "stop" and isinstance(value, list) and all(isinstance(s, str) for s in value)
        if not (isinstance(value, bool | int | float | str) or stop_list):
            allowed = "a string or a list of strings" if key == "stop" else "a number, a boolean or a string"
            raise InvalidDefaults(f"defaults.{key} must be {allowed}, got {type(value).__name__}",
                                  param=f"defaults.{key}", expected=allowed, actual=type(value).__name__)
        texts = value if isinstance(value, list) else [value] if isinstance(value, str) else []
        if not all(encodable(t) for t in texts):
            raise InvalidDefaults(f"defaults.{key} must be valid text (no lone surrogate)", param=f"defaults.{key}",
                                  expected="UTF-8 text", actual="a lone surrogate")
    return dict(defaults)


def parse_defaults(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidDefaults("the defaults metadata must be a JSON object", expected="a JSON object",
                              actual=raw[:40]) from None
    return check_defaults(value)


def encode_defaults(defaults: dict[str, Any]) -> str:
    return json.dumps(defaults, ensure_ascii=False, sort_keys=True)
