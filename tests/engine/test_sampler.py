"""The sampler on hand-made logits: greedy, top-k, top-p, and each request's own random stream."""

import torch

from server.engine.sampler import make_generator, pick
from server.engine.sequence import SamplingParams, Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    return [pick(row, seq) for row, seq in zip(logits, seqs, strict=True)]


def request(**params) -> Sequence:
    seq = Sequence(prompt_ids=[1], params=SamplingParams(**params))
    seq.rng = make_generator(seq.params)
    return seq


def test_greedy_takes_the_argmax_and_has_no_random_stream():
    seq = request()
    assert seq.rng is None
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0]])
    assert sample(logits, [seq]) == [1]


def test_top_k_one_is_greedy_whatever_the_temperature():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    seqs = [request(temperature=5.0, top_k=1, seed=i) for i in range(8)]
    assert sample(logits, seqs) == logits.argmax(dim=-1).tolist()


def test_top_k_and_top_p_never_pick_outside_their_set():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0, -2.0]])
    top2 = request(temperature=1.0, top_k=2, seed=1)
    assert {sample(logits, [top2])[0] for _ in range(200)} <= {0, 1}
    # probabilities ~ [0.66, 0.24, 0.09, ...]: top_p=0.8 keeps the first two (0.66 < 0.8 <= 0.90)
    nucleus = request(temperature=1.0, top_p=0.8, seed=2)
    picked = {sample(logits, [nucleus])[0] for _ in range(300)}
    assert picked == {0, 1}


def test_a_seed_gives_the_same_tokens_whatever_shares_the_batch():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    alone = request(temperature=1.0, seed=42)
    first = [sample(logits[1:2], [alone])[0] for _ in range(5)]
    crowded = request(temperature=1.0, seed=42)
    others = [request(temperature=1.0, seed=7), request()]
    second = [sample(logits[[0, 1, 2]], [others[0], crowded, others[1]])[1] for _ in range(5)]
    assert first == second


def test_a_tiny_temperature_is_nearly_greedy_not_a_nan():
    # Found by the schemathesis run: temperature 1.26e-301 made logits / temperature overflow to inf, the
    # softmax NaN and the request a 500.
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 30
    seqs = [request(temperature=t, seed=3, top_p=p) for t in (1e-300, 1e-45, 1e-8) for p in (1.0, 0.5)]
    assert sample(logits, seqs) == logits.argmax(dim=-1).tolist()
