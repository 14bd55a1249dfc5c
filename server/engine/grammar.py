"""Structured output: a request's response format as a grammar, applied as a mask on its next-token logits.

llguidance (a maintained Rust library, CPU only, made for this) compiles a JSON schema, "any JSON object" or
a regular expression against the model's tokenizer and says, before each token, which tokens keep the
output inside the grammar.

What a format may cost is bounded, and a format is accepted only if it can be honoured:
- Each request gets a matcher of its own, built from the format's grammar, with llguidance's parser and
  lexer limits to itself. (Copies of one matcher share one lexer and its budget: a format's first request
  could spend it and leave the next ones failing at their first mask.) Its first mask is computed at
  admission, so the costly first look at a grammar never runs on the engine thread.
- A format is probed once, on a matcher of its own with the budget a request will have: its first masks
  along one path, forced tokens followed. What fails there, or takes longer than the compile timeout, is a
  422 naming `response_format`; the verdict is kept, so a repeated hostile format is refused at once.
- Compiling runs in a small pool of its own (`COMPILE_WORKERS`), never on the engine thread; a request
  waits at most the compile timeout from the moment its compilation starts.
- `Grammars` keeps, per distinct format, the grammar's text and the verdict, within a byte budget (least
  recently used out). Matchers live only as long as their request.

Masks touch only the rows of requests that have a format: every other request in the batch is untouched.
A request whose grammar is complete (nothing more can follow but the end) stops there, finish reason "stop";
end of sequence is allowed only where the grammar accepts. A grammar that fails mid-generation (its limits
reached on a path the probe did not take) ends its request alone with an error naming `response_format`,
never with text that breaks the format. Reported log-probabilities stay the raw distribution's.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch

from server.engine.errors import InvalidParameter, check_encodable

FormatKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
MAX_SPEC_CHARS = 64 * 1024  # a schema or pattern longer than this is refused before it is compiled
COMPILE_WORKERS = 2  # formats compiled at once; more wait their turn (each is bounded by llguidance's limits)
PROBE_STEPS = 4  # masks the probe computes along one path before a format is accepted
# llguidance's fuel for analysing a grammar's regular expressions (~50k a millisecond), a fifth of its default:
# a 300-property schema, a 2,000-value enum and e-mail or date patterns need far less, while a repetition
# bomb like a{1000000000} now fails at its first mask in ~0.05 s instead of passing it after ~1 s.
INITIAL_LEXER_FUEL = 200_000
# JSON as OpenAI's structured output writes it: single spaces after separators, no free whitespace (a model
# cannot wander into newlines forever). A schema's own "x-guidance" options still win.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
PARAM = "response_format"
MAX_FORMAT_CHOICES = 1024


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What a request's output must match: any JSON object, JSON valid for `spec` (a schema, as JSON text), the
    regular expression `spec`, one of the strings of `spec` (a JSON list: vLLM's `choice`), or the grammar `spec`
    (Lark, or GBNF/EBNF with `::=` rules: vLLM's `grammar`)."""

    kind: FormatKind
    spec: str = ""

    @classmethod
    def json_schema(cls, schema: Any) -> ResponseFormat:
        try:
            # In the order declared: the output's properties follow it (OpenAI and vLLM keep it; a schema may put
            # "reasoning" before "answer" on purpose). A schema with its keys in another order is another format.
            text = json.dumps(schema, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidParameter(PARAM, "a JSON schema", f"{type(exc).__name__}: {exc}") from None
        return cls("json_schema", text)

    def __post_init__(self) -> None:
        if len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidParameter(PARAM, f"a schema or pattern of at most {MAX_SPEC_CHARS} characters",
                                   f"{len(self.spec)} characters")
        check_encodable(self.spec, PARAM)

    @property
    def nbytes(self) -> int:
        return len(self.spec.encode())

    @classmethod
    def choice(cls, choices: Any) -> ResponseFormat:
        if (not isinstance(choices, list) or not choices or len(choices) > MAX_FORMAT_CHOICES
                or not all(isinstance(c, str) and c for c in choices)):
            raise InvalidParameter(PARAM, f"a list of 1..{MAX_FORMAT_CHOICES} non-empty strings", choices)
        return cls("choice", json.dumps(choices, ensure_ascii=False))

    @property
    def what(self) -> str:
        return {"regex": "a regular expression", "json_schema": "a JSON schema", "grammar": "a grammar (Lark or GBNF)",
                "choice": "a list of choices"}.get(self.kind, "a format")


class FormatBroken(InvalidParameter):
    """A request's grammar failed while it generated (a limit reached on its path): its own error alone."""

    def __init__(self, tokens: int, cause: str) -> None:
        super().__init__(PARAM, "a format structured output can follow to its end (llguidance's limits)",
                         f"its grammar failed after {tokens} generated token(s): {cause}")


class RequestGrammar:
    """One request's matcher, its own: the mask before each token, then the token taken."""

    def __init__(self, matcher: Any, first_mask: torch.Tensor) -> None:
        self._matcher = matcher
        self._next_mask: torch.Tensor | None = first_mask  # computed at admission, off the engine thread
        self._taken = 0

    def mask(self, row: torch.Tensor) -> None:
        """Set to -inf, in place, every logit `[vocab]` of a token the grammar does not allow next."""
        allowed, self._next_mask = self._next_mask, None
        if allowed is None:
            allowed = _allowed(self._matcher, row.shape[-1])
        if self._matcher.is_error():  # its error state allows end of sequence alone: never a silent end
            raise FormatBroken(self._taken, _first_line(self._matcher.get_error()))
        row.masked_fill_(~allowed[:row.shape[-1]].to(row.device), float("-inf"))

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise FormatBroken(self._taken, _first_line(self._matcher.get_error())
                               or f"token {token} was not allowed")
        self._taken += 1

    @property
    def ended(self) -> bool:
        """The output is complete: the grammar allows nothing more (but the end of sequence)."""
        return bool(self._matcher.is_stopped())


@dataclass(slots=True)
class _Verdict:
    """What the probe found for a format: its grammar's text, or why it is refused."""

    grammar: str | None
    refusal: InvalidParameter | None
    nbytes: int


class Grammars:
    """Compiles response formats against one tokenizer, one matcher per request; keeps each format's verdict
    within `cache_bytes`. Safe from any thread; compiles in its own pool, never on the caller's thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int], *, cache_bytes: int = 16 * 2**20,
                 compile_timeout_s: float = 10.0) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(eos_ids) or None
        self.cache_bytes = cache_bytes
        self.compile_timeout_s = compile_timeout_s
        self._tokenizer: Any = None  # llguidance's view of the tokenizer: built at the first format (~1 s)
        self._verdicts: OrderedDict[ResponseFormat, _Verdict] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def for_request(self, fmt: ResponseFormat) -> RequestGrammar:
        """A matcher of the request's own, its first mask computed; InvalidParameter (`response_format`) when
        the format cannot be honoured or compiles for longer than the compile timeout.

        Compiled in the pool; the caller waits at most the timeout from the moment its compilation starts (a
        request queued behind others is not charged for their time). Past it, the request gets a 422, and once
        the compilation it started has ended (it cannot be stopped) the format is refused from then on."""
        started = threading.Event()
        begun = [0.0]

        def compile_it() -> RequestGrammar:
            begun[0] = time.monotonic()
            started.set()
            return self._compile_for_request(fmt)

        future = self._executor().submit(compile_it)
        started.wait()
        try:
            return future.result(timeout=max(0.0, self.compile_timeout_s - (time.monotonic() - begun[0])))
        except TimeoutError:
            refusal = InvalidParameter(PARAM, f"a format that compiles within {self.compile_timeout_s:g} s "
                                       "(--format-compile-timeout-s)",
                                       f"{fmt.what} still compiling after {self.compile_timeout_s:g} s")
            future.add_done_callback(lambda _: self._keep(fmt, _Verdict(None, refusal, fmt.nbytes), replace=True))
            raise refusal from None

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._cached_bytes

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- compile-pool side -------------------------------------------------------------------------

    def _compile_for_request(self, fmt: ResponseFormat) -> RequestGrammar:
        verdict = self._verdict(fmt)
        if verdict.refusal is not None:
            raise verdict.refusal
        assert verdict.grammar is not None
        matcher = self._matcher(verdict.grammar)
        first = _allowed(matcher, self._vocab_size)
        if matcher.is_error():  # the probe passed this very mask: a limit this request alone reached
            raise self._refusal(fmt, matcher)
        return RequestGrammar(matcher, first)

    def _verdict(self, fmt: ResponseFormat) -> _Verdict:
        with self._lock:
            verdict = self._verdicts.get(fmt)
            if verdict is not None:
                self._verdicts.move_to_end(fmt)
                return verdict
        grammar, refusal = None, None
        try:
            grammar = self._grammar_text(fmt)
            self._probe(fmt, grammar)
        except InvalidParameter as exc:
            grammar, refusal = None, exc
        verdict = _Verdict(grammar, refusal, fmt.nbytes + len((grammar or str(refusal)).encode()))
        self._keep(fmt, verdict)
        return verdict

    def _keep(self, fmt: ResponseFormat, verdict: _Verdict, replace: bool = False) -> None:
        with self._lock:
            old = self._verdicts.pop(fmt, None)
            if old is not None and not replace:
                self._verdicts[fmt] = old
                return
            self._cached_bytes -= old.nbytes if old is not None else 0
            self._verdicts[fmt] = verdict
            self._cached_bytes += verdict.nbytes
            while self._cached_bytes > self.cache_bytes and self._verdicts:
                _, old = self._verdicts.popitem(last=False)
                self._cached_bytes -= old.nbytes

    def _grammar_text(self, fmt: ResponseFormat) -> str:
        from llguidance import LLMatcher

        if fmt.kind == "regex":
            return str(LLMatcher.grammar_from_regex(fmt.spec))
        if fmt.kind == "choice":  # each choice a string literal of a one-rule grammar (JSON's escapes are Lark's)
            return str(LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(fmt.spec))))
        if fmt.kind == "grammar":
            from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

            try:
                return str(LLMatcher.grammar_from_lark(any_to_lark(fmt.spec)))
            except (GbnfToLarkError, ValueError) as exc:
                raise InvalidParameter(PARAM, fmt.what, str(exc)[:1000]) from None
        schema = json.loads(fmt.spec) if fmt.kind == "json_schema" else {"type": "object"}
        if not isinstance(schema, dict):
            raise InvalidParameter(PARAM, "a JSON schema (an object)", type(schema).__name__)
        return str(LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS))  # type: ignore[arg-type]

    def _probe(self, fmt: ResponseFormat, grammar: str) -> None:
        """Refuse `grammar` unless a matcher of its own (a request's budget) gets through its first masks,
        each time taking the first token allowed (a forced token, where there is only one)."""
        matcher = self._matcher(grammar)
        for _ in range(PROBE_STEPS):
            if matcher.is_error():
                break
            allowed = _allowed(matcher, self._vocab_size)
            if matcher.is_error() or matcher.is_stopped():
                break
            ids = allowed.nonzero().flatten().tolist()
            go_on = [t for t in ids if t not in (self._eos or ())]
            if not go_on:  # only the end may follow: a complete output
                break
            if not matcher.consume_token(go_on[0]):
                break
        if matcher.is_error():
            raise self._refusal(fmt, matcher)

    def _refusal(self, fmt: ResponseFormat, matcher: Any) -> InvalidParameter:
        return InvalidParameter(PARAM, f"{fmt.what} that structured output supports (llguidance)",
                                " ".join(line.strip() for line in matcher.get_error().splitlines()
                                         if line.strip() and line.strip() != "<non-verbose/>")[:1000])

    def _matcher(self, grammar: str) -> Any:
        from llguidance import LLMatcher, LLParserLimits

        # Not verbose: an error names its cause, not the parser's state (which quotes the grammar at length).
        limits = LLParserLimits(initial_lexer_fuel=INITIAL_LEXER_FUEL, verbose_errors=False)
        return LLMatcher(self._llg_tokenizer(), grammar, log_level=0, limits=limits)

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self._vocab_size,
                                                                   eos_token=self._eos)
                except ValueError as exc:  # a slow (Python) tokenizer: llguidance reads only fast ones
                    raise InvalidParameter(PARAM, "absent: this model's tokenizer cannot drive structured output",
                                           str(exc)) from None
            return self._tokenizer

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="promptswap-format")
            return self._pool


def _allowed(matcher: Any, vocab_size: int) -> torch.Tensor:
    """The matcher's next-token mask as booleans `[vocab_size]`."""
    words = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)
    matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
    bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1  # [words, 32], token 32 * w + b
    return bits.flatten()[:vocab_size].bool()


def _first_line(error: str) -> str:
    return next((line.strip() for line in error.splitlines() if line.strip()), "")
