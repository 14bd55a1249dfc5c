"""A conversation as the model reads it: the tokenizer's own chat template over its messages, opened by the
task's system message when the conversation brings none. Admission renders it with the same task snapshot
that gives the request its weights, so a concurrent upload can never pair one version's system message with
another version's prompt.

Tools (OpenAI's function definitions) and the tool-calling fields of messages (an assistant's `tool_calls`, a
tool result's `tool_call_id`) go to the template as they are: a template that supports tools renders them in
its own way, one that does not ignores them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.engine.errors import InvalidParameter

SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True, slots=True)
class Conversation:
    """Chat messages as (role, text) pairs; `add_generation_prompt` ends them where the assistant's turn begins.
    `tools`: the functions the template renders (OpenAI's {"type": "function", "function": {...}} objects);
    `extras`: none, or one mapping per message of the keys it has beside role and content (tool_calls,
    tool_call_id, name)."""

    messages: tuple[tuple[str, str], ...]
    add_generation_prompt: bool = True
    tools: tuple[Mapping[str, Any], ...] = ()
    extras: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.extras and len(self.extras) != len(self.messages):
            raise ValueError(f"{len(self.extras)} extras for {len(self.messages)} messages")

    def with_system(self, system: str | None) -> Conversation:
        """Opened by `system` unless it brings a system (or developer) message of its own. A task made for a chat
        model carries the system turn it was made with: the chat template would put its default one there."""
        if system is None or any(role in SYSTEM_ROLES for role, _ in self.messages):
            return self
        extras = ({}, *self.extras) if self.extras else ()
        return Conversation((("system", system), *self.messages), self.add_generation_prompt, self.tools, extras)

    def render(self, tokenizer: Any) -> str:
        """The conversation as the tokenizer's chat template writes it (its special tokens included)."""
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidParameter("messages", "a model with a chat template (this model's tokenizer has none: use "
                                   "/v1/completions or /generate)", f"{len(self.messages)} messages")
        extras = self.extras or ({},) * len(self.messages)
        conversation = [{"role": role, "content": text, **extra}
                        for (role, text), extra in zip(self.messages, extras, strict=True)]
        tools = [dict(tool) for tool in self.tools] or None
        try:
            return str(tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False,
                                                     add_generation_prompt=self.add_generation_prompt))
        except Exception as exc:  # the template's own checks (e.g. roles must alternate) speak for it
            raise InvalidParameter("messages", "a conversation this model's chat template accepts",
                                   f"{type(exc).__name__}: {exc}") from None
