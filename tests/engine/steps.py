"""Stand-ins for the runner and the logits processor in scheduler tests (no torch, no model)."""

from server.engine.scheduler import Batch, StepResult


def sampled(batch: Batch, tokens: list[int]) -> list[StepResult]:
    """StepResults as if the step ran and picked `tokens`, in order, for the requests that reach their next token."""
    picks = iter(tokens)
    results = [StepResult(s, n, token=next(picks) if s.samples_after(n) else None) for s, n in batch]
    assert next(picks, None) is None, "one token per request that samples"
    return results
