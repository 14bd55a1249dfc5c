"""Runs a scheduled step on the model: the storage prepared, the task prefixes first used now computed, the
batch's one forward pass. A failure fails only the requests it concerns: when a prefix cannot be computed, its
readers; when the batched pass fails, each request is run alone and only those that fail again get the error.
"""

from __future__ import annotations

import logging
from functools import partial

from server.engine.errors import RequestFailed
from server.engine.pages import SharedPrefix
from server.engine.runner import ModelRunner, StepOutput
from server.engine.scheduler import Batch, ScheduledStep, Scheduler

log = logging.getLogger(__name__)


class StepExecutor:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, vocab_size: int) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.vocab_size = vocab_size

    def run(self, step: ScheduledStep) -> StepOutput:
        """The step's logits rows (none when it runs nothing)."""
        if step.preempted:
            log.info("KV pool full: preempted %d request(s), to be recomputed", len(step.preempted))
        if step.storage is not None:
            self.runner.prepare(step.storage)
        computed = self._prepare_prefixes(step.new_prefixes)
        batch = [(seq, n) for seq, n in step.batch if not seq.finished]
        if not batch and not computed:
            return StepOutput.join([], self.vocab_size)
        return self._forward(batch, computed)

    def settle(self) -> None:
        """After a step: when nothing runs any more, give back the storage no page uses."""
        if not self.scheduler.running:
            self.runner.prepare(self.scheduler.kv.idle_storage_plan())

    def _prepare_prefixes(self, entries: list[SharedPrefix]) -> list[SharedPrefix]:
        """Write the prefix tables first used this step; return the soft prompts, which the step's own forward
        pass computes."""
        computed = []
        for entry in entries:
            if self.runner.is_computed(entry):
                computed.append(entry)
            else:
                self._prepare_alone(entry)
        return computed

    def _prepare_alone(self, entry: SharedPrefix) -> None:
        """Compute (or write) one prefix on its own; if that fails, only the requests reading it fail."""
        try:
            self.runner.compute_prefix(entry)
        except Exception as exc:
            log.exception("could not compute a task prefix")
            self.scheduler.fail_prefix(entry, RequestFailed(f"could not prepare the task prefix: {exc}"))
            return
        _ready(entry)

    def _forward(self, batch: Batch, prefixes: list[SharedPrefix]) -> StepOutput:
        """Run the batch (computing `prefixes` in the same pass); if it fails, compute each prefix and run each
        request alone, so only the failing ones get the error."""
        try:
            output = self.runner.run(batch, prefixes)
        except Exception:
            log.exception("batched step failed; retrying its %d requests one by one", len(batch))
        else:
            for entry in prefixes:
                _ready(entry)
            return output
        for entry in prefixes:
            self._prepare_alone(entry)
        alone = []
        for seq, n in batch:
            if seq.finished:  # its prefix failed above
                continue
            try:
                alone.append(self.runner.run([(seq, n)]))
            except Exception as exc:
                self.scheduler.end(seq, partial(seq.fail, RequestFailed(f"the model failed on this request: {exc}")))
        return StepOutput.join(alone, self.vocab_size)


def _ready(entry: SharedPrefix) -> None:
    entry.ready = True
    entry.source = None
