"""Which requests run in the next step, and how many of their tokens. Plain Python, no torch.

Every step, in this order: each running request that decodes gets its one token; running
requests still prefilling continue with a chunk; then waiting requests are admitted first come,
first served, while a slot, KV memory and the step's token budget allow. A long prompt is thus
prefilled in chunks beside the decodes and never stalls them for more than one step's budget.

KV memory is counted as the slot layout spends it (see `kv_store`): every running request holds
a slot as long as the longest one may grow, so `slots * longest <= budget`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.engine.sequence import Sequence, Status


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_running: int = 64
    max_tokens_per_step: int = 512
    kv_budget_positions: int = 1 << 20  # slot positions the KV memory holds (all layers counted)

    def __post_init__(self) -> None:
        for name in ("max_running", "max_tokens_per_step", "kv_budget_positions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_tokens_per_step < self.max_running:
            raise ValueError(
                f"max_tokens_per_step ({self.max_tokens_per_step}) must be >= max_running ({self.max_running}) "
                "so that every running request can decode in each step"
            )


@dataclass(slots=True)
class ScheduledStep:
    batch: list[tuple[Sequence, int]] = field(default_factory=list)  # (request, tokens to compute now)
    admitted: list[Sequence] = field(default_factory=list)  # newly given a slot this step

    def __bool__(self) -> bool:
        return bool(self.batch)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def fits_alone(self, seq: Sequence) -> bool:
        """Whether `seq` could ever run: with no one else, its slot must fit the KV budget."""
        return seq.max_total_len <= self.config.kv_budget_positions

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
        longest = max((s.max_total_len for s in self.running), default=0)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.waiting[0]
            new_longest = max(longest, seq.max_total_len)
            if (len(self.running) + 1) * new_longest > self.config.kv_budget_positions:
                break  # first come, first served: wait for memory rather than let others overtake
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.admitted.append(seq)
            n = min(seq.num_uncached, budget)
            step.batch.append((seq, n))
            budget -= n
            longest = new_longest
        return step

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out of whichever queue holds it."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
