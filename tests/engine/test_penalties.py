"""Repetition, presence and frequency penalties in the real engine: greedy tokens equal a greedy loop over PEFT's
forward with transformers' RepetitionPenaltyLogitsProcessor (repetition) and OpenAI's formula (presence and
frequency) applied to the same logits, for every task kind, beside requests without penalties."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from server.engine.admission import EngineRequest
from server.engine.errors import InvalidParameter
from server.engine.sequence import SamplingParams
from tests.peft_reference import greedy

TEXT = "the quick brown fox jumps over the lazy dog the quick brown fox"
STEPS = 16


def penalties(repetition: float = 1.0, presence: float = 0.0, frequency: float = 0.0):
    repeat = RepetitionPenaltyLogitsProcessor(repetition) if repetition != 1.0 else None

    def process(x, logits, out):
        if repeat is not None:
            logits = repeat(x, logits)  # over the text's ids and the generated ones: what generate() gives it
        if out:
            counts = torch.bincount(torch.tensor(out), minlength=logits.shape[-1]).float()
            logits = logits - frequency * counts - presence * (counts > 0).float()
        return logits

    return process


def reference_tokens(reference, task, **penalty) -> list[int]:
    peft = reference.peft
    model = peft.model(None if task is None else reference.adapter_dirs[task])
    return greedy(model, list(peft.tokenizer(TEXT)["input_ids"]), STEPS, penalties(**penalty))


CASES = [{"repetition": 1.8}, {"repetition": 0.7}, {"presence": 1.5}, {"frequency": 0.9},
         {"repetition": 1.3, "presence": 0.5, "frequency": 0.5}]


@pytest.mark.parametrize("task", [None, "pt8", "ptune5", "prefix16"])
def test_penalized_greedy_tokens_equal_peft_with_transformers_processors(make_engine, reference, task):
    engine = make_engine(max_running=8)
    plain = SamplingParams(max_new_tokens=STEPS, ignore_eos=True)
    handles = [engine.submit(EngineRequest(TEXT, task=task, params=SamplingParams(
        max_new_tokens=STEPS, ignore_eos=True, repetition_penalty=case.get("repetition", 1.0),
        presence_penalty=case.get("presence", 0.0), frequency_penalty=case.get("frequency", 0.0))))
        for case in CASES]
    beside = engine.submit(EngineRequest(TEXT, task=task, params=plain))  # the same batch, no penalty
    for case, handle in zip(CASES, handles, strict=True):
        assert list(handle.result(timeout=120).token_ids) == reference_tokens(reference, task, **case), case
    assert list(beside.result(timeout=120).token_ids) == reference.greedy(task, TEXT, STEPS)


def test_penalties_change_the_answer(make_engine, reference):
    """The tiny model repeats itself; a strong repetition penalty visibly changes its greedy answer."""
    engine = make_engine()
    free = engine.submit(EngineRequest(TEXT, params=SamplingParams(max_new_tokens=STEPS, ignore_eos=True)))
    penal = engine.submit(EngineRequest(TEXT, params=SamplingParams(max_new_tokens=STEPS, ignore_eos=True,
                                                                    repetition_penalty=5.0)))
    assert free.result(timeout=60).token_ids != penal.result(timeout=60).token_ids


@pytest.mark.parametrize(("field", "value"), [("repetition_penalty", 0.0), ("repetition_penalty", 11.0),
                                              ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                              ("presence_penalty", float("nan"))])
def test_penalties_are_range_checked(field, value):
    with pytest.raises(InvalidParameter) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field


@pytest.mark.parametrize("task", [None, "pt8", "prefix16"])
def test_logit_bias_greedy_tokens_equal_peft_with_the_bias_added_and_neighbours_are_untouched(make_engine, reference,
                                                                                              task):
    peft = reference.peft
    model = peft.model(None if task is None else reference.adapter_dirs[task])
    ids = list(peft.tokenizer(TEXT)["input_ids"])
    plain = greedy(model, ids, STEPS)
    bias = ((plain[0], -100.0), (plain[1], -5.0), (7, 3.5))  # the first pick banned: the answer must change

    def biased(x, logits, out):
        for token, value in bias:
            logits[0, token] += value
        return logits

    engine = make_engine(max_running=8)
    handle = engine.submit(EngineRequest(TEXT, task=task, params=SamplingParams(
        max_new_tokens=STEPS, ignore_eos=True, logit_bias=bias)))
    beside = engine.submit(EngineRequest(TEXT, task=task, params=SamplingParams(max_new_tokens=STEPS,
                                                                                ignore_eos=True)))
    got = list(handle.result(timeout=120).token_ids)
    assert got == greedy(model, ids, STEPS, biased) and got[0] != plain[0]
    assert list(beside.result(timeout=120).token_ids) == plain


@pytest.mark.parametrize(("bias", "param"), [(((1, 101.0),), "logit_bias.1"), (((-1, 1.0),), "logit_bias"),
                                             (tuple((i, 1.0) for i in range(301)), "logit_bias")])
def test_logit_bias_is_checked(bias, param):
    with pytest.raises(InvalidParameter) as caught:
        SamplingParams(logit_bias=bias)
    assert caught.value.param == param


def test_a_logit_bias_past_the_vocabulary_is_refused_at_admission(make_engine):
    engine = make_engine()
    with pytest.raises(InvalidParameter, match="vocabulary size"):
        engine.submit(EngineRequest(TEXT, params=SamplingParams(logit_bias=((10**6, 1.0),))))
