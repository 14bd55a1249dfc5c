"""Which requests run in the next step, and what their results do to them. Plain Python, no torch.

`schedule()`, every step, in this order: cancelled requests end; each running request that decodes gets its
one token; running requests still prefilling continue with a chunk; then waiting requests are admitted, in
the admission policy's order (policy.py), while a running place, KV pages and the step's token budget allow.
A long prompt is thus prefilled in chunks beside the decodes and never stalls them for more than one step's
budget. Every page a request takes or gives back goes through the KV manager (kv_manager.py).

Memory follows use: a request gets the pages its tokens of this step fill, no more. When a running request
cannot grow because the pool ran out, the newest running request is preempted: its pages go back and it
waits at the front of the queue to be recomputed (finding its own pages again in the prefix cache when
nobody needed them meanwhile). Every request fits alone (`fits_alone` is checked at submission), so the
pool can never deadlock.

`postprocess()`, after the step ran, takes one `StepResult` per request: each request's cache advances by
the tokens computed, the sampled tokens are appended, and requests that hit a stop, the end of sequence or
their length (or scored every choice, or failed) end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from server.engine.errors import EngineError, InvalidConfig, RequestCancelled, check_int
from server.engine.kv_manager import KVManager, StoragePlan
from server.engine.pages import PAGE_SIZE, SharedPrefix
from server.engine.policy import AdmissionPolicy
from server.engine.results import TokenLogprob
from server.engine.sequence import Sequence, Status

Batch = list[tuple[Sequence, int]]  # (request, tokens computed for it in this step)


@dataclass(slots=True)
class StepResult:
    """What one step did for one request (logits.py fills it from the step's logits rows)."""

    seq: Sequence
    n: int  # tokens computed for it
    token: int | None = None  # the token it picked, if it reached its next one
    logprob: TokenLogprob | None = None  # that token's, when asked
    scored: bool = False  # a scoring request scored its last choice
    error: EngineError | None = None  # reading its rows failed: it ends with this error, the others go on


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_running: int = 64
    max_tokens_per_step: int = 512
    kv_pages: int = 1 << 16  # pages in the KV pool (PAGE_SIZE positions each, all layers counted)
    prefix_cache_pages: int = 1 << 12  # pages idle task prefixes may keep
    prefix_caching: bool = True  # reuse the full pages other requests computed for the same prefix and tokens

    def __post_init__(self) -> None:
        for name in ("max_running", "max_tokens_per_step", "kv_pages"):
            check_int(name, getattr(self, name), low=1)
        check_int("prefix_cache_pages", self.prefix_cache_pages, low=0)
        if not isinstance(self.prefix_caching, bool):
            raise InvalidConfig("prefix_caching", "a boolean", self.prefix_caching)
        if self.max_tokens_per_step < self.max_running:
            raise InvalidConfig("max_tokens_per_step", f"an integer >= max_running ({self.max_running}) so that "
                                "every running request can decode in each step", self.max_tokens_per_step)


@dataclass(slots=True)
class ScheduledStep:
    batch: Batch = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # newly running this step
    new_prefixes: list[SharedPrefix] = field(default_factory=list)  # to compute before the step runs
    preempted: list[Sequence] = field(default_factory=list)
    storage: StoragePlan | None = None  # what the runner's storage must hold (or give back) for the step

    def __bool__(self) -> bool:
        return bool(self.batch)


class Scheduler:
    def __init__(self, config: SchedulerConfig, eos_ids: frozenset[int] = frozenset(),
                 on_end: Callable[[Sequence], None] = lambda seq: None) -> None:
        self.config = config
        self.kv = KVManager(config.kv_pages, config.prefix_cache_pages, config.prefix_caching)
        self.policy = AdmissionPolicy(self.kv, max_overtaken=config.max_running)
        self.eos_ids = eos_ids  # a generated token in here ends its request (unless it ignores EOS)
        self.on_end = on_end  # told each request that ends, after its pages are back, before its caller hears
        self.waiting: deque[Sequence] = deque()
        self.held: list[Sequence] = []  # samples waiting for their first sample's text (Sequence.after)
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.preemptions = 0
        self.peak_running = 0

    def forget_history(self) -> None:
        """As if nothing had run (after the compiled step's warm-up: what it ran is not what was served)."""
        self.preemptions = 0
        self.peak_running = 0
        self.kv.forget_history()

    def fits_alone(self, seq: Sequence) -> bool:
        return self.kv.fits_alone(seq)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        (self.held if seq.after is not None else self.waiting).append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.held)

    def unfinished(self) -> list[Sequence]:
        return [*self.running, *self.waiting, *self.held]

    def _release_held(self) -> None:
        """Samples whose first sample computed the text go first in line: they read its pages, computing only
        the text's last page (each its own, from there on: copy-on-write at the first page they differ)."""
        ready = [seq for seq in self.held if seq.after is not None and seq.after.text_computed]
        for seq in reversed(ready):
            self.held.remove(seq)
            seq.after = None  # holds the first sample no longer
            self.waiting.appendleft(seq)

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        for seq in self.unfinished():
            if seq.cancelled:
                self.end(seq, partial(seq.fail, RequestCancelled()))
        self._release_held()
        self._continue_running(step)
        self._admit_waiting(step)
        self.peak_running = max(self.peak_running, len(self.running))
        step.storage = self.kv.storage_plan()
        return step

    def _continue_running(self, step: ScheduledStep) -> None:
        """Decodes first (cheap and latency-bound), then the prefills' next chunks and the choices' steps."""
        budget = self.config.max_tokens_per_step
        for decoding in (True, False):
            for seq in list(self.running):
                if seq.status is not Status.RUNNING:
                    continue  # preempted meanwhile
                if seq.scoring is not None and seq.scoring.due:
                    if decoding:
                        continue  # with the prefills
                    n = seq.scoring.tokens
                    if self._waits_for_room(n, budget, step) or not self._grow(seq, step, self.kv.grow_choices):
                        continue
                elif seq.in_prefill == decoding:
                    continue  # not this pass's kind
                else:
                    n = 1 if decoding else min(seq.num_uncached, budget)
                    if n <= 0 or not self._grow(seq, step, partial(self.kv.grow, n=n)):
                        continue
                step.batch.append((seq, n))
                budget -= n

    def _admit_waiting(self, step: ScheduledStep) -> None:
        budget = self.config.max_tokens_per_step - sum(n for _, n in step.batch)
        self.policy.new_step()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            chosen = self.policy.next(self.waiting, self.running)
            if chosen is None:
                break  # the next pages are being computed: reading them beats computing them twice
            seq, cached = chosen
            if not self.kv.can_admit(seq, cached, others_running=bool(self.running)):
                break  # wait for memory rather than let smaller requests overtake it
            # A soft prompt first used now has its virtual tokens computed in this step's pass: they count.
            prefix_tokens = seq.num_virtual if self.kv.computes_prefix(seq) else 0
            if self._waits_for_room(prefix_tokens, budget - 1, step):
                break  # a later step has room for the prefix and at least one text token
            n = min(seq.num_tokens - len(cached) * PAGE_SIZE, max(1, budget - prefix_tokens))
            new_prefix = self.kv.admit(seq, cached, n)
            if new_prefix is not None and new_prefix not in step.new_prefixes:
                step.new_prefixes.append(new_prefix)
            self.policy.take(self.waiting, seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.admitted.append(seq)
            step.batch.append((seq, n))
            budget -= n + prefix_tokens

    def _waits_for_room(self, n: int, budget: int, step: ScheduledStep) -> bool:
        """Whether `n` tokens that must go in one step (a new task prefix, the choices' step) wait for a later
        step: when they are over this step's budget and a later one could hold them beside one token of
        every running request. Only what no step could hold goes over the budget."""
        room = self.config.max_tokens_per_step - len(self.running)
        return n > budget and bool(step.batch) and n < room

    def _grow(self, seq: Sequence, step: ScheduledStep, grow: Callable[[Sequence], bool]) -> bool:
        """`grow(seq)` (the KV manager's), preempting the newest running requests while the pool is short;
        False if `seq` itself was the newest and had to give way."""
        while not grow(seq):
            victim = self.running[-1]
            self.preempt(victim, step)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        """Take `seq`'s pages back and queue it first in line, to be recomputed when memory allows."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_cached = seq.pages_registered = 0
        if seq.scoring is not None:
            seq.scoring.restart()  # it computes its text again, then its choices
        seq.preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1
        step.preempted.append(seq)
        step.batch[:] = [(s, n) for s, n in step.batch if s is not seq]
        if seq in step.admitted:
            step.admitted.remove(seq)

    # -- after the step ------------------------------------------------------------------------

    def postprocess(self, results: list[StepResult]) -> list[Sequence]:
        """The step ran: advance caches, append each picked token, end the requests that are done (or failed)
        and return them."""
        for r in results:
            if r.error is None and not r.seq.computes_choices(r.n):  # the choices' tokens are not its own
                r.seq.num_cached += r.n
                self.kv.register_full_pages(r.seq)
        finished = []
        for r in results:
            seq = r.seq
            if r.error is not None:
                self.end(seq, partial(seq.fail, r.error))
            elif r.scored:
                self.end(seq, seq.finish_scoring)
            elif r.token is not None and (reason := seq.append(r.token, self.eos_ids, r.logprob)) is not None:
                self.end(seq, partial(seq.finish, reason))
            else:
                continue
            finished.append(seq)
        return finished

    def end(self, seq: Sequence, announce: Callable[[], None]) -> None:
        """End `seq` in this order, whatever fails: out of its queue with its pages back, `on_end` (its place),
        then `announce` (its caller hears the result), so a caller that sees it done never sees its memory still
        held."""
        try:
            if seq.status is Status.RUNNING:
                self.running.remove(seq)
            elif seq.status is Status.WAITING and seq in self.waiting:
                self.waiting.remove(seq)
            elif seq in self.held:
                self.held.remove(seq)
            seq.status = Status.FINISHED
            self.kv.free(seq)
        finally:
            try:
                self.on_end(seq)
            finally:
                announce()

    def fail_prefix(self, entry: SharedPrefix, error: EngineError) -> None:
        """A task prefix could not be computed: hand it to no one else; the requests reading it end with `error`
        (the next request of the task computes it anew)."""
        self.kv.forget_prefix(entry)
        for seq in [s for s in self.running if s.prefix is entry]:
            self.end(seq, partial(seq.fail, error))
