"""What happens to a step's logits rows: the one place that reads them.

For each request of the step (`StepOutput`): a scoring request scores its choices; a request whose
prompt tokens are scored records theirs; a request that reached its next token has it picked
(sampler.py) after its penalties, among what its grammar allows, if it has one (grammar.py), and, when
asked, reported with its log-probability. The result per request is a
`StepResult` for the scheduler's postprocess. Log-probabilities are always from the raw next-token
distribution (before temperature, top-k and top-p), as OpenAI and vLLM report them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from collections.abc import Sequence as TypingSequence
from contextlib import contextmanager

import torch

from server.engine.errors import EngineError, RequestFailed
from server.engine.results import TokenLogprob
from server.engine.runner import StepOutput
from server.engine.sampler import pick
from server.engine.scheduler import StepResult
from server.engine.sequence import Sequence

log = logging.getLogger(__name__)


def process(output: StepOutput) -> list[StepResult]:
    """One StepResult per request of the step, in batch order. What fails while reading one request's rows (its
    scoring, its penalties, its grammar's mask or advance, its draw) is that request's own error
    (`StepResult.error`); every other request gets the token it would have had alone."""
    results: list[StepResult] = []
    picking: list[tuple[StepResult, torch.Tensor]] = []
    for request in output.requests:
        result = StepResult(request.seq, request.n)
        results.append(result)
        rows = output.logits[request.rows]  # [kept, vocab]
        with _own_failure(result):
            if _reads(result, rows):
                picking.append((result, rows[-1]))
    if picking:
        best = torch.stack([row for _, row in picking]).argmax(dim=-1).tolist()  # the plain greedy rows, at once
        for (result, row), argmax in zip(picking, best, strict=True):
            with _own_failure(result):
                _pick(result, row, argmax)
    return results


def _reads(result: StepResult, rows: torch.Tensor) -> bool:
    """Score or record what the step's rows give `result`'s request; True when it picks its next token."""
    seq, n = result.seq, result.n
    if seq.scoring is not None:
        result.scored = seq.scoring.score(rows, choices_step=seq.computes_choices(n))
        return False
    if seq.params.prompt_logprobs and len(rows) == n:  # row r predicts the step's token r + 1
        seq.record_prompt_logprobs(n, token_logprobs(rows, seq.all_ids[seq.num_cached + 1:], seq.params.logprobs or 0))
    return seq.samples_after(n)


def _pick(result: StepResult, row: torch.Tensor, argmax: int) -> None:
    """The request's next token from its raw row `[vocab]`: shaped, drawn, taken by its grammar, reported."""
    seq = result.seq
    shaped = _shaped(row, seq)
    token = argmax if shaped is row and seq.params.greedy else pick(shaped, seq)
    if seq.grammar is not None:
        seq.grammar.advance(token)
    top = seq.params.logprobs
    if top is not None:  # from the raw row: a grammar's mask is not the model's distribution
        result.logprob = token_logprobs(row[None], [token], top)[0]
    result.token = token


@contextmanager
def _own_failure(result: StepResult) -> Iterator[None]:
    """Whatever `result`'s request raises becomes its own error; the step goes on with the others."""
    try:
        yield
    except EngineError as exc:  # the request asked for something that cannot be done (its format broke)
        log.info("request ended by its own parameters: %s", exc.message)
        result.error = exc
    except Exception as exc:
        log.exception("picking one request's next token failed; that request alone fails")
        result.error = RequestFailed(f"could not pick this request's next token: {type(exc).__name__}: {exc}")


def _shaped(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """`row` as the request samples from it: its penalties applied, then its grammar's mask (on a float32
    copy, when it has either); the row itself otherwise. Log-probabilities are read from the raw row.

    Repetition: transformers' RepetitionPenaltyLogitsProcessor over the text's and the generated tokens (a
    positive logit divided by the penalty, a negative one multiplied). Presence and frequency: OpenAI's and
    vLLM's, over the generated tokens only (each seen token's logit lowered by presence, and by frequency times
    its count). Logit bias: OpenAI's, each listed token's logit raised or lowered by its bias."""
    p = seq.params
    if not p.penalized and seq.grammar is None:
        return row
    out = row.float().clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.all_ids)), dtype=torch.long, device=out.device)
        score = out[seen]
        out[seen] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
        counts = torch.bincount(torch.tensor(seq.output_ids, device=out.device), minlength=out.shape[-1])
        counts = counts[:out.shape[-1]].to(out.dtype)
        out -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(out.dtype)
    if p.logit_bias:  # OpenAI's: added to the token's logit (ids past the model's logits checked at admission)
        ids, values = zip(*p.logit_bias, strict=True)
        out[torch.tensor(ids, device=out.device)] += torch.tensor(values, dtype=out.dtype, device=out.device)
    if seq.grammar is not None:
        seq.grammar.mask(out)
    return out


def token_logprobs(rows: torch.Tensor, targets: TypingSequence[int], top: int) -> list[TokenLogprob]:
    """For each row (up to len(targets)): the target token's log-probability in the row's raw distribution,
    and the `top` most likely tokens there."""
    rows = rows[:len(targets)]
    if not len(rows):
        return []
    logprobs = torch.log_softmax(rows.float(), dim=-1)  # [k, vocab]
    chosen = logprobs[torch.arange(len(rows)), torch.tensor(list(targets[:len(rows)]), dtype=torch.long)].tolist()
    best_values, best_ids = (torch.topk(logprobs, top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0].long()))
    return [TokenLogprob(int(t), lp, tuple(zip(ids, values, strict=True)))
            for t, lp, ids, values in zip(targets, chosen, best_ids.tolist(), best_values.tolist(), strict=False)]
