"""What happens to a step's logits rows: the one place that reads them.

For each request of the step (`StepOutput`): a scoring request scores its choices; a request whose
prompt tokens are scored records theirs; a request that reached its next token has it picked
(sampler.py) after its penalties, among what its grammar allows, if it has one (grammar.py), and, when
asked, reported with its log-probability. The result per request is a
`StepResult` for the scheduler's postprocess. Log-probabilities are always from the raw next-token
distribution (before temperature, top-k and top-p), as OpenAI and vLLM report them.
"""

from __future__ import annotations

from collections.abc import Sequence as TypingSequence

import torch

from server.engine.runner import StepOutput
from server.engine.sampler import sample
from server.engine.scheduler import StepResult
from server.engine.sequence import TokenLogprob


def process(output: StepOutput) -> list[StepResult]:
    """One StepResult per request of the step, in batch order."""
    results: list[StepResult] = []
    picking: list[StepResult] = []
    pick_rows: list[torch.Tensor] = []
    for request in output.requests:
        seq, n = request.seq, request.n
        rows = output.logits[request.rows]  # [kept, vocab]
        result = StepResult(seq, n)
        results.append(result)
        if seq.scoring is not None:
            result.scored = seq.scoring.score(rows, choices_step=seq.computes_choices(n))
            continue
        if seq.params.prompt_logprobs and len(rows) == n:  # row r predicts the step's token r + 1
            seq.record_prompt_logprobs(n, token_logprobs(rows, seq.all_ids[seq.num_cached + 1:],
                                                         seq.params.logprobs or 0))
        if seq.samples_after(n):
            picking.append(result)
            pick_rows.append(rows[-1:])
    if picking:
        picks = torch.cat(pick_rows)  # [k, vocab]
        tokens = sample(_shaped(picks, picking), [r.seq for r in picking])
        for i, (result, token) in enumerate(zip(picking, tokens, strict=True)):
            result.token = token
            grammar = result.seq.grammar
            if grammar is not None:
                grammar.advance(token)
            top = result.seq.params.logprobs
            if top is not None:  # from the raw rows: a grammar's mask is not the model's distribution
                result.logprob = token_logprobs(picks[i:i + 1], [token], top)[0]
    return results


def _shaped(picks: torch.Tensor, picking: list[StepResult]) -> torch.Tensor:
    """`picks` as each request samples from them: its penalties applied, then its grammar's mask (a copy, when any
    request has either); the rows of the others as they are. Log-probabilities are read from `picks` itself.

    Repetition: transformers' RepetitionPenaltyLogitsProcessor over the text's and the generated tokens (a
    positive logit divided by the penalty, a negative one multiplied). Presence and frequency: OpenAI's and
    vLLM's, over the generated tokens only (each seen token's logit lowered by presence, and by frequency times
    its count)."""
    rows = [i for i, r in enumerate(picking) if r.seq.params.penalized or r.seq.grammar is not None]
    if not rows:
        return picks
    out = picks.clone()
    for i in rows:
        seq, row = picking[i].seq, out[i]
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.all_ids)), dtype=torch.long, device=row.device)
            score = row[seen]
            row[seen] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
            counts = torch.bincount(torch.tensor(seq.output_ids, device=row.device), minlength=row.shape[-1])
            counts = counts[:row.shape[-1]].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        if seq.grammar is not None:
            seq.grammar.mask(row)
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
