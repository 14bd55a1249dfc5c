"""Which requests run in the next step, and what their results do to them. Plain Python, no torch.

`schedule()`, every step, in this order: each running request that decodes gets its one token;
running requests still prefilling continue with a chunk; then waiting requests are admitted first
come, first served, while a slot, KV memory (see `kv_budget`) and the step's token budget allow. A
long prompt is thus prefilled in chunks beside the decodes and never stalls them for more than one
step's budget.

`postprocess()`, after the step ran: each request's cache advances by the tokens computed, the
sampled tokens are appended, and requests that hit a stop, the end of sequence or their length
finish.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.errors import InvalidConfig, check_int
from server.engine.kv_budget import SlotBudget
from server.engine.sequence import Sequence, Status

Batch = list[tuple[Sequence, int]]  # (request, tokens computed for it in this step)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_running: int = 64
    max_tokens_per_step: int = 512
    kv_budget_positions: int = 1 << 20  # slot positions the KV memory holds (all layers counted)

    def __post_init__(self) -> None:
        for name in ("max_running", "max_tokens_per_step", "kv_budget_positions"):
            check_int(name, getattr(self, name), low=1)
        if self.max_tokens_per_step < self.max_running:
            raise InvalidConfig("max_tokens_per_step", f"an integer >= max_running ({self.max_running}) so that "
                                "every running request can decode in each step", self.max_tokens_per_step)


@dataclass(slots=True)
class ScheduledStep:
    batch: Batch = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # newly given a slot this step

    def __bool__(self) -> bool:
        return bool(self.batch)


class Scheduler:
    def __init__(self, config: SchedulerConfig, eos_ids: frozenset[int] = frozenset()) -> None:
        self.config = config
        self.budget = SlotBudget(config.kv_budget_positions)
        self.eos_ids = eos_ids  # a generated token in here ends its request (unless it ignores EOS)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def fits_alone(self, seq: Sequence) -> bool:
        """Whether `seq` could ever run: with no one else, its slot must fit the KV budget."""
        return self.budget.admits([seq])

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.config.max_tokens_per_step
        for seq in self.running:  # decodes first: they are cheap and latency-bound
            if not seq.in_prefill:
                step.batch.append((seq, 1))
                budget -= 1
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                n = min(seq.num_uncached, budget)
                step.batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.waiting[0]
            if not self.budget.admits([*self.running, seq]):
                break  # first come, first served: wait for memory rather than let others overtake
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.admitted.append(seq)
            n = min(seq.num_uncached, budget)
            step.batch.append((seq, n))
            budget -= n
        return step

    def postprocess(self, batch: Batch, tokens: list[int],
                    release: Callable[[Sequence], None] = lambda seq: None) -> list[Sequence]:
        """The step ran: advance caches, append `tokens` (one per request that sampled, in batch
        order), finish the requests that are done and return them. A finished request's memory is
        given back (`release`) before its caller hears the result, so a caller that sees it done never
        sees its memory still held."""
        sampling = [seq for seq, n in batch if seq.samples_after(n)]
        assert len(sampling) == len(tokens), "one sampled token per request that samples"
        # Every cache first: releasing a slot moves another request's KV, which must include this step's.
        for seq, n in batch:
            seq.num_cached += n
        finished = []
        for seq, token in zip(sampling, tokens, strict=True):
            reason = seq.append(token, self.eos_ids)
            if reason is not None:
                self.finish(seq)
                try:
                    release(seq)
                finally:  # out of the queues either way: its caller must hear the end
                    seq.finish(reason)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out of whichever queue holds it (if any)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
