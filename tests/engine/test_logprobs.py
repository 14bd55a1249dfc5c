"""Log-probabilities: each generated token's, and each prompt token's when asked, with the top alternatives,
equal PEFT's raw next-token distribution (before temperature, top-k and top-p) for every prompt kind."""

from __future__ import annotations

import pytest
import torch

from server.engine.admission import EngineRequest
from server.engine.errors import InvalidParameter
from server.engine.results import TokenDelta
from server.engine.sequence import SamplingParams
from tests.engine.test_paged_memory import tight_engine

TEXT = "the quick brown fox jumps over the lazy dog"


def peft_logprobs(reference, adapter_dirs, task, ids: list[int]) -> torch.Tensor:
    """log_softmax of PEFT's logits for every position of `ids` (virtual positions dropped)."""
    model = reference.peft.model(None if task is None else adapter_dirs[task])
    x = torch.tensor([ids])
    with torch.inference_mode():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
    return torch.log_softmax(logits[logits.shape[0] - len(ids):], dim=-1)


def check(entry, expected_row: torch.Tensor, token: int, k: int) -> None:
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(expected_row[token].item(), abs=2e-4)
    values, ids = torch.topk(expected_row, k)
    assert [t for t, _ in entry.top] == ids.tolist()
    assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=2e-4)


@pytest.mark.parametrize("task", [None, "pt8", "ptune5", "prefix16"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generated_token_logprobs_are_peft_raw_distribution(make_engine, reference, adapter_dirs, task, temperature):
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=5, temperature=temperature, top_k=20,
                            seed=3)
    handle = make_engine().submit(EngineRequest(TEXT, task=task, params=params))
    streamed = [lp for item in handle for lp in (item.logprobs if isinstance(item, TokenDelta) else ())]
    done = handle.result(timeout=60)
    assert done.logprobs is not None and len(done.logprobs) == 6 and list(done.logprobs) == streamed
    prompt = list(reference.peft.tokenizer(TEXT)["input_ids"])
    expected = peft_logprobs(reference, adapter_dirs, task, prompt + list(done.token_ids))
    for i, (entry, token) in enumerate(zip(done.logprobs, done.token_ids, strict=True)):
        check(entry, expected[len(prompt) - 1 + i], token, 5)  # the untempered distribution


@pytest.mark.parametrize("task", [None, "pt64", "prefix16"])
def test_prompt_token_logprobs_equal_peft_and_survive_preemption(make_engine, reference, adapter_dirs, task):
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, logprobs=2, prompt_logprobs=True)
    alone = make_engine(max_running=4, max_tokens_per_step=16).submit(EngineRequest(TEXT, task=task,
                                                                                    params=params)).result(timeout=60)
    prompt = list(reference.peft.tokenizer(TEXT)["input_ids"])
    expected = peft_logprobs(reference, adapter_dirs, task, prompt)
    assert alone.prompt_logprobs is not None and len(alone.prompt_logprobs) == len(prompt) - 1
    for i, entry in enumerate(alone.prompt_logprobs):  # chunked prefill (16 tokens a step) included
        check(entry, expected[i], prompt[i + 1], 2)
    engine = tight_engine(make_engine, pages=10, max_running=8)
    crowd = [engine.submit(EngineRequest(f"lazy dog {i}", task="pt8", params=SamplingParams(max_new_tokens=40,
                                                                                            ignore_eos=True)))
             for i in range(4)]
    squeezed = engine.submit(EngineRequest(TEXT, task=task, params=params)).result(timeout=60)
    for h in crowd:
        h.result(timeout=60)
    assert engine.stats().preemptions > 0
    for got, want in ((squeezed.prompt_logprobs, alone.prompt_logprobs), (squeezed.logprobs, alone.logprobs)):
        assert [e.token_id for e in got] == [e.token_id for e in want]  # each position once, in order
        assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=2e-4)


def test_logprobs_out_of_range_are_refused():
    for value in (-1, 21, 2.5):
        with pytest.raises(InvalidParameter) as caught:
            SamplingParams(logprobs=value)
        assert caught.value.param == "logprobs"
    assert SamplingParams().logprobs is None
