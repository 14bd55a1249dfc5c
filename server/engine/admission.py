"""Admission: one request as a caller hands it to the engine, checked once and turned into a Sequence.

Every rule a request meets before it queues lives here, in this order: the task's prompt version
(read once: its weights, template and defaults all come from that one version), the task's
generation defaults for what the request did not set, the text template, the length checks, the
choices to score, and whether the KV budget could ever hold the request. The routes only translate
their own field names; the engine's loop never sees a request that breaks a rule.
"""

from __future__ import annotations

from collections.abc import Sequence as TypingSequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from prompt_store.template import MAX_CHOICE_CHARS, apply_template
from server.engine.chat import Conversation
from server.engine.detokenizer import IncrementalText
from server.engine.errors import InvalidParameter, RequestTooLong, check_encodable
from server.engine.grammar import Grammars, ResponseFormat
from server.engine.pages import PAGE_SIZE
from server.engine.sampler import make_generator
from server.engine.scoring import ChoiceScoring
from server.engine.sequence import MAX_CHOICES, MAX_SEED, SamplingParams, Sequence

if TYPE_CHECKING:
    from prompt_store.registry import PromptSnapshot
    from server.engine.scheduler import Scheduler


class TaskSource(Protocol):
    """What the engine needs from the prompt store: a task's current prompt version, or UnknownTask."""

    def get(self, task: str) -> PromptSnapshot: ...


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One request as a caller hands it to the engine (`Engine.submit`)."""

    text: str = ""  # unused when `conversation` is given
    task: str | None = None  # None: the base model alone
    params: SamplingParams = field(default_factory=SamplingParams)
    # The SamplingParams fields the caller set: the task's generation defaults fill the others. None: every
    # field was set (the task's defaults are not used).
    sent: frozenset[str] | None = None
    max_new_tokens_cap: int | None = None  # a task's default max_new_tokens above this is lowered to it
    raw: bool = False  # skip the task's text template
    choices: TypingSequence[str] | bool | None = None  # score these (True: the task's stored ones) instead
    add_special_tokens: bool = True  # False for a conversation a chat template already framed (no second BOS)
    response_format: ResponseFormat | None = None  # structured output: what the generated text must match
    n: int = 1  # samples of the text (Engine.submit_samples): its pages are computed once and shared
    # A chat instead of `text`: rendered by the tokenizer's chat template at admission, with the task's system
    # message from the same snapshot as its weights; no text template, no second BOS.
    conversation: Conversation | None = None


def with_task_defaults(params: SamplingParams, defaults: dict | None, sent: frozenset[str] | None,
                       cap: int | None) -> SamplingParams:
    """The task's generation defaults for every field the request did not send (an endpoint's own defaults,
    such as OpenAI's, do not count as sent). A default max_new_tokens above the server's cap is lowered to it."""
    if not defaults or sent is None:
        return params
    fill = {k: v for k, v in defaults.items() if k not in sent}
    if cap is not None and isinstance(fill.get("max_new_tokens"), int):
        fill["max_new_tokens"] = min(fill["max_new_tokens"], cap)
    return replace(params, **fill) if fill else params


@dataclass(frozen=True, slots=True)
class TokenizedText:
    ids: list[int]  # the text's tokens, after the task's template
    virtual_tokens: int  # the task's, in front of them
    templated: str | None  # the text as the template framed it (None: no template applied)


class Admission:
    """Checks a request against the model, its task and the KV budget; builds its Sequence."""

    def __init__(self, tokenizer: Any, tasks: TaskSource, max_context: int, scheduler: Scheduler,
                 grammars: Grammars, vocab_size: int) -> None:
        self.vocab_size = vocab_size  # the model's logits: what a logit bias may name
        self.tokenizer = tokenizer
        self.tasks = tasks
        self.max_context = max_context
        self.scheduler = scheduler
        self.grammars = grammars
        # No token spans more characters than the longest vocabulary entry, so a text of N characters
        # has at least N / this many tokens: a cheap bound that refuses a huge text before tokenizing it.
        self.longest_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1) or 1

    def admit_samples(self, request: EngineRequest) -> list[Sequence]:
        """The request's `n` samples, ready to queue, the first first. The others wait until the first has
        computed the text (Sequence.after), then read its pages. A seeded request's sample i draws from seed + i,
        so every sample is repeatable; greedy samples are all the same."""
        n = request.n  # checked by the engine (SampleGroup.check_n)
        if n > 1 and request.choices not in (None, False):
            raise InvalidParameter("n", "1 with choices (scoring has one answer)", n)
        first = self.admit(request)
        samples = [first]
        for i in range(1, n):
            params = first.params
            if params.seed is not None:
                params = replace(params, seed=(params.seed + i) % (MAX_SEED + 1))
            grammar = self.grammars.for_request(request.response_format) if request.response_format else None
            seq = Sequence(prompt_ids=list(first.prompt_ids), params=params, task=first.task, prompt=first.prompt,
                           num_virtual=first.num_virtual, grammar=grammar, after=first,
                           detokenizer=IncrementalText(self.tokenizer, first.prompt_ids, params.stop))
            seq.rng = make_generator(params)
            samples.append(seq)
        return samples

    def admit(self, request: EngineRequest) -> Sequence:
        """The request's (first) Sequence, ready to queue; errors a client caused are raised here."""
        snapshot = self.tasks.get(request.task) if request.task is not None else None  # UnknownTask
        params = with_task_defaults(request.params, snapshot.defaults if snapshot is not None else None,
                                    request.sent, request.max_new_tokens_cap)
        for token, _ in params.logit_bias:
            if token >= self.vocab_size:
                raise InvalidParameter("logit_bias", f"token ids below the model's vocabulary size {self.vocab_size}",
                                       token)
        text = self.text_ids(request, snapshot)
        num_virtual, prompt_ids = text.virtual_tokens, text.ids
        used = num_virtual + len(prompt_ids)
        scoring = None
        if request.choices is not None and request.choices is not False:
            scoring = ChoiceScoring(self._choices(request.choices, snapshot, used))
            if params.prompt_logprobs:
                raise InvalidParameter("choices", "absent with prompt log-probabilities (echo)", "both")
            params = replace(params, logprobs=None)  # a scoring answer has no per-token ones (a default may ask)
        grammar = None
        if request.response_format is not None:
            if scoring is not None:
                raise InvalidParameter("response_format", "absent with choices (the choices are the answers)",
                                       request.response_format.kind)
            grammar = self.grammars.for_request(request.response_format)
        # Generation stops at the context's end (finish_reason "length") rather than refusing.
        params = replace(params, max_new_tokens=min(params.max_new_tokens, self.max_context - used))
        seq = Sequence(prompt_ids=prompt_ids, params=params, task=request.task, prompt=snapshot,
                       num_virtual=num_virtual, detokenizer=IncrementalText(self.tokenizer, prompt_ids, params.stop),
                       scoring=scoring, grammar=grammar)
        if not self.scheduler.fits_alone(seq):
            what, param = ("the choices' tokens", "choices") if scoring else ("max_new_tokens", "max_new_tokens")
            kv_pages = self.scheduler.config.kv_pages
            raise RequestTooLong(kv_pages * PAGE_SIZE, seq.max_total_len,
                                 f"virtual + text + {what} need {seq.pages_needed()} KV pages of {PAGE_SIZE} "
                                 f"positions; the KV budget holds {kv_pages}", param=param)
        seq.rng = make_generator(seq.params)
        return seq

    def tokenize(self, request: EngineRequest) -> TokenizedText:
        """What the model would read for `request`'s text: its task's template applied (unless raw), the tokens
        and the task's virtual-token count, with the same checks as a generating request."""
        return self.text_ids(request, self.tasks.get(request.task) if request.task is not None else None)

    def text_ids(self, request: EngineRequest, snapshot: PromptSnapshot | None) -> TokenizedText:
        """The text's tokens as the model reads them after the task's virtual tokens; refused when they and one
        token to generate would not fit the context."""
        num_virtual = snapshot.num_virtual_tokens if snapshot is not None else 0
        text, special = request.text, request.add_special_tokens
        templated = (snapshot is not None and not request.raw and snapshot.template is not None
                     and request.conversation is None)
        if request.conversation is not None:  # the same version's system message as its weights
            conversation = request.conversation.with_system(snapshot.system if snapshot is not None else None)
            text, special = conversation.render(self.tokenizer), False
        elif snapshot is not None and not request.raw:
            text = apply_template(snapshot.template, text)  # the same version's template as its weights
        check_encodable(text)
        at_least = -(-len(text) // self.longest_token_chars)
        if num_virtual + at_least + 1 > self.max_context:
            raise RequestTooLong(self.max_context - 1, num_virtual + at_least,
                                 f"{num_virtual} virtual + at least {at_least} text tokens in {len(text)} characters, "
                                 "+1 to generate")
        ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        if not ids:
            raise InvalidParameter("text", "a text that gives at least one token", text)
        if num_virtual + len(ids) + 1 > self.max_context:
            raise RequestTooLong(self.max_context - 1, num_virtual + len(ids),
                                 f"{num_virtual} virtual + {len(ids)} text tokens, +1 to generate")
        return TokenizedText(ids, num_virtual, text if templated else None)

    def _choices(self, choices: TypingSequence[str] | bool, snapshot: PromptSnapshot | None,
                 used: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Each choice with its tokens (`tokenizer(choice, add_special_tokens=False)`, appended to the text's)."""
        if choices is True:
            if snapshot is None or not snapshot.choices:
                raise InvalidParameter("choices", "a list of strings, or true for a task that stores its choices "
                                       "(trained with promptswap train)",
                                       f"true, but {'no task was named' if snapshot is None else 'the task has none'}")
            texts = list(snapshot.choices)
        else:
            texts = list(choices)  # type: ignore[arg-type]  # not a bool here
        if not 1 <= len(texts) <= MAX_CHOICES:
            raise InvalidParameter("choices", f"1..{MAX_CHOICES} strings", len(texts))
        longest = max((len(t) for t in texts if isinstance(t, str)), default=0)
        if longest > MAX_CHOICE_CHARS:
            raise InvalidParameter("choices", f"strings of at most {MAX_CHOICE_CHARS} characters", longest)
        if len(set(texts)) != len(texts):
            raise InvalidParameter("choices", "distinct strings", texts)
        scored = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise InvalidParameter(f"choices[{i}]", "a non-empty string", text)
            check_encodable(text, f"choices[{i}]")
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise InvalidParameter(f"choices[{i}]", "a choice that gives at least one token", text)
            if used + len(ids) > self.max_context:
                raise RequestTooLong(self.max_context, used + len(ids),
                                     f"the text and choice {i} ({len(ids)} tokens) need {used + len(ids)} positions",
                                     param=f"choices[{i}]")
            scored.append((text, ids))
        # The choices' tokens but each one's last go through one step together: they must fit one.
        together = sum(len(ids) - 1 for _, ids in scored)
        step_tokens = self.scheduler.config.max_tokens_per_step
        if together > step_tokens:
            raise InvalidParameter("choices", f"choices whose tokens (but each one's last) fit one step: at most "
                                   f"{step_tokens} (--max-tokens-per-step)", together)
        return tuple(scored)
