"""Scoring choices: every choice's log-probability given the task and the text equals PEFT's, computed with
`PeftModel.forward` on each (text + choice) alone, for every prompt kind; the text is computed once and
shared by all choices; choices share batches with generating requests and survive preemption."""

from __future__ import annotations

import pytest
import torch

from server.engine.admission import EngineRequest
from server.engine.errors import InvalidParameter
from server.engine.results import ChoiceScores
from server.engine.sequence import SamplingParams
from tests.engine.test_paged_memory import tight_engine

# Of one token ("the") to sixteen: a one-token choice is scored by the text's logits alone, beside the others.
CHOICES = ["yes", "no way", "the quick brown fox jumps over", "東京", "a lazy dog", "price", "the"]
TEXT = "select the price from the model where"


def reference_scores(reference, adapter_dirs, task, text, choices):
    """{choice: (sum of log-probabilities, tokens)} with PEFT's forward on text + choice alone."""
    tokenizer = reference.peft.tokenizer
    model = reference.peft.model(None if task is None else adapter_dirs[task])
    text_ids = list(tokenizer(text)["input_ids"])
    scores = {}
    for choice in choices:
        ids = list(tokenizer(choice, add_special_tokens=False)["input_ids"])
        x = torch.tensor([text_ids + ids])
        with torch.inference_mode():
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        virtual = logits.shape[0] - x.shape[1]  # a soft prompt's virtual tokens come first in PEFT's logits
        total = sum(logprobs[virtual + len(text_ids) - 1 + j, token].item() for j, token in enumerate(ids))
        scores[choice] = (total, len(ids))
    return scores


@pytest.mark.parametrize("task", [None, "pt8", "ptune5", "prefix16", "prefix64proj", "pt64"])
def test_choice_logprobs_equal_peft_for_every_kind(make_engine, reference, adapter_dirs, task):
    result = make_engine().submit(EngineRequest(TEXT, task=task, choices=CHOICES)).result(timeout=60)
    assert isinstance(result, ChoiceScores)
    expected = reference_scores(reference, adapter_dirs, task, TEXT, CHOICES)
    assert sorted(c.text for c in result.choices) == sorted(CHOICES)
    for choice in result.choices:
        total, n = expected[choice.text]
        assert choice.num_tokens == n
        assert choice.logprob == pytest.approx(total, abs=2e-4), choice.text
        assert choice.mean_logprob == pytest.approx(total / n, abs=2e-4)
    logprobs = [c.logprob for c in result.choices]
    assert logprobs == sorted(logprobs, reverse=True) and result.best == result.choices[0].text
    assert result.usage.completion_tokens == sum(n for _, n in expected.values())


def test_scoring_shares_a_batch_with_generation_and_other_scoring(make_engine, reference, adapter_dirs):
    engine = make_engine(max_running=8)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    generating = [engine.submit(EngineRequest(t, task=k, params=params)) for t, k in (("the lazy dog", "pt8"), ("fox",
                                                                                                                None))]
    scoring = [engine.submit(EngineRequest(TEXT, task=k, choices=CHOICES)) for k in ("prefix16", "ptune5", None)]
    for handle, task in zip(generating, ("pt8", None), strict=True):
        text = "the lazy dog" if task == "pt8" else "fox"
        assert list(handle.result(timeout=60).token_ids) == reference.greedy(task, text, 12)
    for handle, task in zip(scoring, ("prefix16", "ptune5", None), strict=True):
        expected = reference_scores(reference, adapter_dirs, task, TEXT, CHOICES)
        for choice in handle.result(timeout=60).choices:
            assert choice.logprob == pytest.approx(expected[choice.text][0], abs=2e-4)


def test_a_preempted_scoring_request_scores_the_same(make_engine, reference, adapter_dirs):
    engine = tight_engine(make_engine, pages=12, max_running=8)
    long = SamplingParams(max_new_tokens=40, ignore_eos=True)
    crowd = [engine.submit(EngineRequest(f"lazy dog number {i}", task="pt8", params=long)) for i in range(4)]
    scored = engine.submit(EngineRequest(TEXT * 2, task="prefix16", choices=CHOICES))
    expected = reference_scores(reference, adapter_dirs, "prefix16", TEXT * 2, CHOICES)
    for choice in scored.result(timeout=60).choices:
        assert choice.logprob == pytest.approx(expected[choice.text][0], abs=2e-4)
    for handle in crowd:
        handle.result(timeout=60)
    assert engine.stats().preemptions > 0
    idle = engine.stats()  # only cached task prefixes and the prefix cache's full pages hold pages
    assert idle.kv_pages_used <= idle.kv_pages_shared + idle.kv_pages_cached


def test_bad_choices_are_refused_naming_the_field(make_engine, registry):
    engine = make_engine()
    for choices, param in (([], "choices"), (["a", "a"], "choices"), (["ok", ""], "choices[1]"),
                           ([str(i) for i in range(65)], "choices"), (True, "choices")):
        with pytest.raises(InvalidParameter) as caught:
            engine.submit(EngineRequest(TEXT, task="pt8", choices=choices))
        assert caught.value.param == param, choices


def test_one_token_choices_need_no_second_step_and_stored_choices_are_used(make_engine, reference, adapter_dirs,
                                                                           registry):
    """Choices of one token each are scored by the text's last logits alone; `choices=True` takes the task's
    stored choices."""
    tokenizer = reference.peft.tokenizer
    singles = [w for w in ("a", "the", "price", "fox", "dog", "x") if len(tokenizer(w, add_special_tokens=False)
                                                                          ["input_ids"]) == 1]
    assert len(singles) >= 2
    engine = make_engine()
    result = engine.submit(EngineRequest(TEXT, task="pt8", choices=singles)).result(timeout=60)
    expected = reference_scores(reference, adapter_dirs, "pt8", TEXT, singles)
    for choice in result.choices:
        assert choice.num_tokens == 1 and choice.logprob == pytest.approx(expected[choice.text][0], abs=2e-4)
    from prompt_store.format import write_prompt

    table = registry.get("prefix16").embeddings
    registry.put("with-choices", write_prompt(table, {"kind": "prefix", "choices": '["yes", "no way"]'}))
    stored = engine.submit(EngineRequest(TEXT, task="with-choices", choices=True)).result(timeout=60)
    assert sorted(c.text for c in stored.choices) == ["no way", "yes"]


def test_choices_too_long_for_one_step_or_with_prompt_logprobs_are_refused(make_engine):
    engine = make_engine(max_running=4, max_tokens_per_step=16)
    with pytest.raises(InvalidParameter) as caught:
        engine.submit(EngineRequest(TEXT, task="pt8", choices=["the quick brown fox jumps over the lazy dog " * 2,
                                                               "yes"]))
    assert caught.value.param == "choices" and "max-tokens-per-step" in str(caught.value)
    with pytest.raises(InvalidParameter) as caught:
        engine.submit(EngineRequest(TEXT, choices=["x" * 257]))
    assert caught.value.param == "choices"
    with pytest.raises(InvalidParameter) as caught:
        engine.submit(EngineRequest(TEXT, choices=["yes"], params=SamplingParams(logprobs=1, prompt_logprobs=True)))
    assert caught.value.param == "choices"
