"""Pick each request's next token from its logits, with its own settings and random stream.

A seeded request draws from its own `torch.Generator`, one draw per token, so its tokens do not
depend on what else shares the batch.
"""

from __future__ import annotations

import torch

from server.engine.sequence import SamplingParams, Sequence


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The request's own random stream (None when greedy): seeded, or from the OS."""
    if params.greedy:
        return None
    gen = torch.Generator(device="cpu")  # CPU draws: same stream whatever device the model is on
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def pick(row: torch.Tensor, seq: Sequence) -> int:
    """One request's next token from its logits row `[vocab]`: the argmax when greedy, else a draw."""
    p = seq.params
    if p.greedy:
        return int(row.argmax())
    # In float64 (a float32 temperature of 1e-300 would be 0) and shifted so the largest is 0: a tiny
    # temperature then gives -inf for the others, not inf - inf = NaN in the softmax. Same distribution.
    row = (row.double() - row.max().double()) / p.temperature
    if 0 < p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        probs = _nucleus(probs, p.top_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=seq.rng).item())


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
    sorted_probs[before >= top_p] = 0.0
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()
