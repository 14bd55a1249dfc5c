"""A conversation as the model reads it: the tokenizer's own chat template over its messages, opened by the
task's system message when the conversation brings none. Admission renders it with the same task snapshot
that gives the request its weights, so a concurrent upload can never pair one version's system message with
another version's prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.engine.errors import InvalidParameter

SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True, slots=True)
class Conversation:
    """Chat messages as (role, text) pairs; `add_generation_prompt` ends them where the assistant's turn begins."""

    messages: tuple[tuple[str, str], ...]
    add_generation_prompt: bool = True

    def with_system(self, system: str | None) -> Conversation:
        """Opened by `system` unless it brings a system (or developer) message of its own. A task made for a chat
        model carries the system turn it was made with: the chat template would put its default one there."""
        if system is None or any(role in SYSTEM_ROLES for role, _ in self.messages):
            return self
        return Conversation((("system", system), *self.messages), self.add_generation_prompt)

    def render(self, tokenizer: Any) -> str:
        """The conversation as the tokenizer's chat template writes it (its special tokens included)."""
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidParameter("messages", "a model with a chat template (this model's tokenizer has none: use "
                                   "/v1/completions or /generate)", f"{len(self.messages)} messages")
        conversation = [{"role": role, "content": text} for role, text in self.messages]
        try:
            return str(tokenizer.apply_chat_template(conversation, tokenize=False,
                                                     add_generation_prompt=self.add_generation_prompt))
        except Exception as exc:  # the template's own checks (e.g. roles must alternate) speak for it
            raise InvalidParameter("messages", "a conversation this model's chat template accepts",
                                   f"{type(exc).__name__}: {exc}") from None
