"""One request's whole state, from admission to its last token. No torch here.

A `Sequence` is what the scheduler moves between queues and what the runner reads positions
from; the engine fills its generated tokens. The public result types (`TokenDelta`,
`Completion`) are what a caller of the engine receives.
"""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

from server.engine.errors import InvalidParameter

FinishReason = Literal["length", "stop", "eos"]

# Hard ceilings that catch nonsense before it reaches the loop; the service applies tighter caps.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its tokens. temperature 0 is greedy (the default)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 1, None)
        if not _is_number(self.temperature) or not (0.0 <= self.temperature <= 100.0):
            raise InvalidParameter("temperature", "a finite number in [0, 100]", self.temperature)
        _check_int("top_k", self.top_k, 0, None)
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise InvalidParameter("top_p", "a number in (0, 1]", self.top_p)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        if isinstance(self.stop, str):  # a lone string is one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        stop = tuple(self.stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidParameter("stop", f"at most {MAX_STOP_STRINGS} strings", len(stop))
        for s in stop:
            if not isinstance(s, str) or not (1 <= len(s) <= MAX_STOP_CHARS):
                raise InvalidParameter("stop", f"non-empty strings of at most {MAX_STOP_CHARS} characters", s)
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameter("ignore_eos", "a boolean", self.ignore_eos)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise InvalidParameter(name, bound, value)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    virtual_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """A new piece of generated text and the tokens that made it (text may lag tokens at UTF-8 seams)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Completion:
    """The final result: the generated continuation only, never the input text."""

    task: str | None
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage


class Status(enum.Enum):
    WAITING = "waiting"  # admitted to the queue, no KV slot yet
    RUNNING = "running"  # holds a KV slot; prefilling or decoding
    FINISHED = "finished"  # done (finished, failed or cancelled); its slot is free


_ids = itertools.count()


@dataclass(slots=True, eq=False)
class Sequence:
    """A request inside the engine.

    Positions: a task adds `num_virtual` positions in front (its KV prefix, computed once per
    prompt version); the text takes positions `num_virtual .. num_virtual + len(prompt_ids) - 1`
    and generated tokens follow. `num_cached` counts the text and generated tokens whose keys
    and values are already in this sequence's KV slot.
    """

    prompt_ids: list[int]
    params: SamplingParams
    task: str | None = None
    prompt: object | None = None  # the prompt_store snapshot this request started with (or None)
    num_virtual: int = 0
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    slot: int | None = None
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    error: BaseException | None = None
    rng: object | None = None  # the sampler's random stream (a torch.Generator), None when greedy

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """Text plus generated tokens (not counting virtual ones)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def total_len(self) -> int:
        """Positions in use now, virtual ones included."""
        return self.num_virtual + self.num_tokens

    @property
    def max_total_len(self) -> int:
        """Positions this request may need by its last token: what the scheduler reserves."""
        return self.num_virtual + len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def num_uncached(self) -> int:
        """Tokens whose keys and values still have to be computed (prefill left, or the last token)."""
        return self.num_tokens - self.num_cached

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
