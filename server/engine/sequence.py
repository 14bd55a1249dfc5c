"""One request's whole state, from submission to its last token, in one object. No torch here.

A `Sequence` carries the request's text tokens, its sampling settings, the task prompt version it
started with, its detokenizer, its random stream, its output channel to the caller and how it
ended. The scheduler moves it between queues, the runner reads positions from it, and
`Sequence.append` / `finish` / `fail` are the only ways its caller hears from the engine.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.engine.channel import OutputChannel
from server.engine.errors import InvalidParameter
from server.engine.pages import pages_for
from server.engine.results import Completion, FinishReason, TokenDelta, TokenLogprob, Usage

if TYPE_CHECKING:
    from prompt_store.registry import PromptSnapshot
    from server.engine.detokenizer import IncrementalText
    from server.engine.grammar import RequestGrammar
    from server.engine.pages import SharedPrefix
    from server.engine.scoring import ChoiceScoring


# The one default of max_new_tokens (the service lowers it to its own cap when that is smaller).
DEFAULT_MAX_NEW_TOKENS = 64
# Hard ceilings that catch nonsense before it reaches the loop; the service applies tighter caps.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
MAX_CHOICES = 64  # choices one request may score
MAX_LOGPROBS = 20  # alternatives reported per token
MAX_SAMPLES = 16  # n: samples of one text
MAX_LOGIT_BIAS = 300  # tokens one request may bias (OpenAI's cap)
# A sane positive range (transformers asks a positive float, vLLM > 0): a logit divided by at most 100 or
# multiplied by at most 10 stays finite in float32, where penalties are applied; 1e-38 overflowed to inf.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 10.0


def normalize_stop(stop: str | Iterable[str] | None) -> tuple[str, ...]:
    """A lone string is one stop string (not its characters); None is none."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    return tuple(stop)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its tokens. temperature 0 is greedy (the default). Every range is checked here."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int | None = None
    stop: tuple[str, ...] = ()  # also accepts a str, a list or None (normalised here)
    ignore_eos: bool = False
    logprobs: int | None = None  # report each generated token's log-probability and this many alternatives
    prompt_logprobs: bool = False  # also each prompt token's (after the first), with as many alternatives
    # transformers' RepetitionPenaltyLogitsProcessor over the text's and the generated tokens (1.0: none)
    repetition_penalty: float = 1.0
    # OpenAI's and vLLM's, over the generated tokens: logit - presence * [seen] - frequency * count (0: none)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # OpenAI's logit_bias: (token id, bias in [-100, 100]) added to the token's logit before sampling
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 1, None)
        if not _is_number(self.temperature) or not (0.0 <= self.temperature <= 100.0):
            raise InvalidParameter("temperature", "a finite number in [0, 100]", self.temperature)
        _check_int("top_k", self.top_k, 0, None)
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise InvalidParameter("top_p", "a number in (0, 1]", self.top_p)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        stop = normalize_stop(self.stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidParameter("stop", f"at most {MAX_STOP_STRINGS} strings", len(stop))
        for s in stop:
            if not isinstance(s, str) or not (1 <= len(s) <= MAX_STOP_CHARS):
                raise InvalidParameter("stop", f"non-empty strings of at most {MAX_STOP_CHARS} characters", s)
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameter("ignore_eos", "a boolean", self.ignore_eos)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if not _is_number(self.repetition_penalty) or not (
                MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise InvalidParameter("repetition_penalty", f"a number in [{MIN_REPETITION_PENALTY:g}, "
                                   f"{MAX_REPETITION_PENALTY:g}]", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not (-2.0 <= value <= 2.0):
                raise InvalidParameter(name, "a number in [-2, 2]", value)
        bias = self.logit_bias
        if not isinstance(bias, tuple) or len(bias) > MAX_LOGIT_BIAS:
            raise InvalidParameter("logit_bias", f"at most {MAX_LOGIT_BIAS} token ids with a bias each",
                                   len(bias) if isinstance(bias, tuple) else bias)
        for entry in bias:
            token, value = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, None)
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise InvalidParameter("logit_bias", "token ids (integers >= 0) as keys", token)
            if not _is_number(value) or not -100.0 <= value <= 100.0:
                raise InvalidParameter(f"logit_bias.{token}", "a number in [-100, 100]", value)
        if self.prompt_logprobs and self.logprobs is None:
            raise InvalidParameter("logprobs", "a number of alternatives when prompt log-probabilities are asked",
                                   None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)
                or bool(self.logit_bias))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high  # type: ignore[operator]  # value is an int here
    if not ok:
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise InvalidParameter(name, bound, value)


class Status(enum.Enum):
    WAITING = "waiting"  # queued (or preempted), holding no KV pages
    RUNNING = "running"  # holds KV pages; prefilling or decoding
    FINISHED = "finished"  # done (finished, failed or cancelled); its pages are free


_ids = itertools.count()


@dataclass(slots=True, eq=False)
class Sequence:
    """A request inside the engine.

    Positions: a task adds `num_virtual` positions in front (its shared KV prefix, computed once
    per prompt content); the text takes positions `num_virtual .. num_virtual + len(prompt_ids) - 1`
    and generated tokens follow. `num_cached` counts the text and generated tokens whose keys
    and values are already in this sequence's own KV `pages`. A preempted request gives its pages
    back and starts again from `num_cached = 0`: it recomputes what it had, keeping its tokens,
    its detokenizer and its random stream, so nothing it already sent is sent again.
    """

    prompt_ids: list[int]
    params: SamplingParams
    task: str | None = None
    prompt: PromptSnapshot | None = None  # the task's prompt version this request started with
    num_virtual: int = 0
    detokenizer: IncrementalText | None = None  # None: token ids only (scheduler tests)
    rng: Any = None  # the sampler's torch.Generator; None when greedy
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    pages: list[int] = field(default_factory=list)  # own KV pages, in position order (pages.py)
    page_digests: list[bytes] = field(default_factory=list)  # prefix caching: the chain digests of its full pages
    pages_registered: int = 0  # leading pages of `pages` that are in the prefix cache
    prefix: SharedPrefix | None = None  # the task prefix's shared pages while it runs
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens read from the prefix cache when it was first admitted (usage)
    overtaken: int = 0  # admissions of requests behind it while it was first in line (scheduler)
    cancelled: bool = False  # set by the caller's handle; the loop drops the request at its next step
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    output: OutputChannel = field(default_factory=OutputChannel)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    scoring: ChoiceScoring | None = None  # scoring choices instead of generating (scoring.py)
    grammar: RequestGrammar | None = None  # structured output: its mask before each token (grammar.py)
    # One of n samples of a text, after the first: it waits until `after` (the first) has computed the text,
    # then reads the text's full pages from the prefix cache instead of computing them again.
    after: Sequence | None = None
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, when asked
    prompt_token_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1.., when asked

    # -- positions ------------------------------------------------------------------------------

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
        """Positions this request may need by its last token, virtual ones included."""
        return self.num_virtual + len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def num_uncached(self) -> int:
        """Tokens whose keys and values still have to be computed (prefill left, or the last token)."""
        return self.num_tokens - self.num_cached

    @property
    def in_prefill(self) -> bool:
        """More than the last token is uncomputed: its prompt (or, after preemption, everything) is due."""
        return self.num_uncached > 1

    def computes_choices(self, n: int) -> bool:
        """Whether a step of `n` tokens is the choices' step (the text is all computed already)."""
        return self.scoring is not None and n > 0 and self.num_cached == self.num_tokens

    def pages_needed(self) -> int:
        """KV pages this request holds by its last token, alone: its prefix's and its own (and its choices')."""
        if self.scoring is not None:
            return pages_for(self.num_virtual) + pages_for(len(self.prompt_ids)) + self.scoring.pages_needed()
        return pages_for(self.num_virtual) + pages_for(self.max_total_len - self.num_virtual)

    def rows_kept(self, n: int) -> int:
        """How many logits rows a step of `n` tokens keeps for this request: every choice token's in the
        choices' step; every token's while prompt tokens are being scored; the last token's when it picks
        (or scores) what follows; else none."""
        if self.computes_choices(n):
            assert self.scoring is not None
            return self.scoring.tokens
        if self.params.prompt_logprobs and len(self.prompt_token_logprobs) < len(self.prompt_ids) - 1:
            return n
        return 1 if self.samples_after(n) else 0

    def record_prompt_logprobs(self, n: int, entries: list[TokenLogprob]) -> None:
        """Log-probabilities of the tokens after each of this step's `n` tokens (`entries`, one per row), kept
        for prompt tokens not yet recorded (a recomputed request sees its positions again)."""
        first = self.num_cached  # index of the step's first token in all_ids; row r predicts first + r + 1
        for r, entry in enumerate(entries):
            target = first + r + 1
            if target < len(self.prompt_ids) and target == len(self.prompt_token_logprobs) + 1:
                self.prompt_token_logprobs.append(entry)

    def samples_after(self, n: int) -> bool:
        """Whether computing `n` more tokens reaches the end, so the step picks this request's next token."""
        return self.num_cached + n == self.num_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def text_computed(self) -> bool:
        """Its text's keys and values are all computed, or it ended: a sample waiting on it may start."""
        return self.finished or (self.status is Status.RUNNING and self.num_cached >= len(self.prompt_ids))

    # -- what the caller hears ------------------------------------------------------------------

    def append(self, token: int, eos_ids: frozenset[int], logprob: TokenLogprob | None = None) -> FinishReason | None:
        """Take a sampled token, hand its text to the caller; return why the request ends now, if it does."""
        self.output_ids.append(token)
        if logprob is not None:
            self.token_logprobs.append(logprob)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        text = self.detokenizer
        self.output.push(TokenDelta(text.add(token) if text is not None else "", (token,),
                                    (logprob,) if logprob is not None else ()))
        if text is not None and text.stopped:
            return "stop"
        if token in eos_ids and not self.params.ignore_eos:
            return "eos"
        if self.grammar is not None and self.grammar.ended:  # the structured output is complete
            return "stop"
        if len(self.output_ids) >= self.params.max_new_tokens:
            return "length"
        return None

    def finish(self, reason: FinishReason) -> None:
        """End with a result: the text held back for a possible stop string goes out, then the Completion."""
        self.status = Status.FINISHED
        self.finish_reason = reason
        text = self.detokenizer
        tail = text.finish() if text is not None else ""
        if tail:
            self.output.push(TokenDelta(tail, ()))
        usage = Usage(len(self.prompt_ids), self.num_virtual, len(self.output_ids), self.cached_tokens)
        full_text = text.text if text is not None else ""
        asked = self.params.logprobs is not None
        self.output.complete(Completion(
            self.task, full_text, tuple(self.output_ids), reason, usage,
            logprobs=tuple(self.token_logprobs) if asked else None,
            prompt_logprobs=tuple(self.prompt_token_logprobs) if self.params.prompt_logprobs else None,
            prompt_ids=tuple(self.prompt_ids),
        ))

    def finish_scoring(self) -> None:
        """End a scoring request: every choice with its log-probability, most likely first."""
        assert self.scoring is not None
        self.status = Status.FINISHED
        self.finish_reason = "length"
        self.output.complete(self.scoring.result(self.task, len(self.prompt_ids), self.num_virtual, self.cached_tokens))

    def fail(self, error: BaseException) -> None:
        """End with an error (cancelled, failed, shut down): the caller gets it instead of a result."""
        self.status = Status.FINISHED
        self.error = error
        self.output.fail(error)
