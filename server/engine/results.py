"""What a request gives its caller: pieces of text as they come, then a completion or the scores of its
choices. Plain data, imported by the engine's parts and the HTTP layer alike (no import circle)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["length", "stop", "eos"]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    virtual_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt tokens, those read from the prefix cache instead of computed


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability in the model's raw next-token distribution (before temperature, top-k and
    top-p, as OpenAI and vLLM report it), and the most likely alternatives there."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """A new piece of generated text and the tokens that made it (text may lag tokens at UTF-8 seams)."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()  # when asked: one per token


@dataclass(frozen=True, slots=True)
class Completion:
    """The final result: the generated continuation only, never the input text."""

    task: str | None
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    logprobs: tuple[TokenLogprob, ...] | None = None  # when asked: one per generated token
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # when asked: prompt tokens 1.. (the first has none)
    prompt_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ChoiceScore:
    text: str
    logprob: float  # log P(choice's tokens | task, text): the sum over its tokens
    mean_logprob: float  # logprob / num_tokens
    num_tokens: int


@dataclass(frozen=True, slots=True)
class ChoiceScores:
    """The result of a request that scores choices instead of generating: every choice, most likely first."""

    task: str | None
    choices: tuple[ChoiceScore, ...]
    usage: Usage

    @property
    def best(self) -> str:
        return self.choices[0].text
