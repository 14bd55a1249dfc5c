"""Structured output: a request's response format as a grammar, applied as a mask on its next-token logits.

llguidance (a maintained Rust library, CPU only, made for this) compiles a JSON schema, "any JSON object" or
a regular expression against the model's tokenizer and says, before each token, which tokens keep the
output inside the grammar. A format is compiled once per distinct spec (`Grammars` keeps the compiled
matchers, least recently used out) and each request starts from a copy, so a schema used by many requests
costs one compilation. Compiling runs at admission, off the engine thread, bounded by llguidance's parser
limits and a size cap on the spec: what it refuses is a 422 naming `response_format`.

Masks touch only the rows of requests that have a format: every other request in the batch is untouched.
A request whose grammar is complete (nothing more can follow but the end) stops there, finish reason "stop".
Reported log-probabilities stay the raw distribution's, as for every other request.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch

from server.engine.errors import InvalidParameter

FormatKind = Literal["json_object", "json_schema", "regex"]
MAX_SPEC_CHARS = 64 * 1024  # a schema or pattern longer than this is refused before it is compiled
CACHED_GRAMMARS = 128
# JSON as OpenAI's structured output writes it: single spaces after separators, no free whitespace (a model
# cannot wander into newlines forever). A schema's own "x-guidance" options still win.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
PARAM = "response_format"


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """What a request's output must match: any JSON object, JSON valid for `spec` (a schema, as JSON text), or
    the regular expression `spec`."""

    kind: FormatKind
    spec: str = ""

    @classmethod
    def json_schema(cls, schema: Any) -> ResponseFormat:
        try:
            text = json.dumps(schema, sort_keys=True, ensure_ascii=False)  # one cache entry per distinct schema
        except (TypeError, ValueError) as exc:
            raise InvalidParameter(PARAM, "a JSON schema", f"{type(exc).__name__}: {exc}") from None
        return cls("json_schema", text)

    def __post_init__(self) -> None:
        if len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidParameter(PARAM, f"a schema or pattern of at most {MAX_SPEC_CHARS} characters",
                                   f"{len(self.spec)} characters")


class RequestGrammar:
    """One request's place in its grammar: the mask before each token, then the token taken."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def mask(self, row: torch.Tensor) -> None:
        """Set to -inf, in place, every logit `[vocab]` of a token the grammar does not allow next."""
        words = torch.empty((row.shape[-1] + 31) // 32, dtype=torch.int32)
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1  # [words, 32], token 32 * w + b
        allowed = bits.flatten()[:row.shape[-1]].bool().to(row.device)
        row.masked_fill_(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"structured output: token {token} was not allowed: {self._matcher.get_error()}")

    @property
    def ended(self) -> bool:
        """The output is complete: the grammar allows nothing more (but the end of sequence)."""
        return bool(self._matcher.is_stopped())


class Grammars:
    """Compiles response formats against one tokenizer; keeps the compiled ones. Safe from any thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(eos_ids) or None
        self._tokenizer: Any = None  # llguidance's view of the tokenizer: built at the first format (~1 s)
        self._compiled: OrderedDict[ResponseFormat, Any] = OrderedDict()
        self._lock = threading.Lock()

    def for_request(self, fmt: ResponseFormat) -> RequestGrammar:
        with self._lock:
            matcher = self._compiled.get(fmt)
            if matcher is not None:
                self._compiled.move_to_end(fmt)
        if matcher is None:
            matcher = self._compile(fmt)
            with self._lock:
                self._compiled[fmt] = matcher
                while len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
        return RequestGrammar(matcher.deep_copy())

    def _compile(self, fmt: ResponseFormat) -> Any:
        from llguidance import LLMatcher

        tokenizer = self._llg_tokenizer()
        if fmt.kind == "regex":
            grammar = LLMatcher.grammar_from_regex(fmt.spec)
        else:
            schema = json.loads(fmt.spec) if fmt.kind == "json_schema" else {"type": "object"}
            if not isinstance(schema, dict):
                raise InvalidParameter(PARAM, "a JSON schema (an object)", type(schema).__name__)
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if not matcher.is_error():  # some errors show only at the first mask: a pattern no text matches
            probe = matcher.deep_copy()
            words = torch.empty((self._vocab_size + 31) // 32, dtype=torch.int32)
            probe.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
            if probe.is_error():
                matcher = probe
        if matcher.is_error():
            what = {"regex": "a regular expression", "json_schema": "a JSON schema"}.get(fmt.kind, "a format")
            raise InvalidParameter(PARAM, f"{what} that structured output supports (llguidance)",
                                   " ".join(line.strip() for line in matcher.get_error().splitlines()
                                            if line.strip())[:1000])
        return matcher

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
