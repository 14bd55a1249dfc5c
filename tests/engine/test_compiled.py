"""The compiled step (server/engine/compiled.py): PEFT's tokens with compilation on, and the eager fallback.

The rest of the suite serves eagerly (tests/conftest.py says why); these engines compile, each in its own
inductor cache folder, so what a test sees is compiled here and not read from an earlier run.
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from server.engine import attention, compiled
from server.engine.admission import EngineRequest
from server.engine.sequence import SamplingParams
from tests.conftest import REAL_UNUSABLE_REASON
from tests.engine.conftest import random_text

pytestmark = pytest.mark.slow  # each engine compiles its model

_ORIGINAL_ATTEND = attention.StepLayout.attend
TASKS = [None, "pt8", "ptune5", "prefix16", "prefix64proj", "pt64", "prefix1", None]


@pytest.fixture
def compiling(monkeypatch, tmp_path):
    monkeypatch.setattr(compiled, "unusable_reason", REAL_UNUSABLE_REASON)  # tests/conftest.py turned it off
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(compiled, "SERVING_STANCE", "fail_on_recompile")  # a step the graphs miss fails the test
    torch._dynamo.reset()  # no graph of an earlier test's engine
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("in_place_from", [0, attention.IN_PLACE_MIN_ROWS], ids=["in-place", "gathered"])
def test_compiled_engine_gives_peft_tokens_for_every_kind_in_one_batch(compiling, make_engine, reference, caplog,
                                                                      monkeypatch, in_place_from):
    # Decode groups this small are gathered by default: 0 makes every one read its pages in place.
    monkeypatch.setattr(attention, "IN_PLACE_MIN_ROWS", in_place_from)
    caplog.set_level(logging.INFO, logger="server.engine")
    engine = make_engine(threads=torch.get_num_threads())  # fixed: a thread change would run steps eagerly
    assert engine.compiled is not None, caplog.text
    assert "compiled step ready in" in caplog.text
    rng = random.Random(7)
    cases = [(task, random_text(rng, rng.randint(2, 14))) for task in TASKS]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    with ThreadPoolExecutor(len(cases)) as pool:  # submitted together: they share steps
        handles = list(pool.map(lambda c: engine.submit(EngineRequest(c[1], task=c[0], params=params)), cases))
    for (task, text), handle in zip(cases, handles, strict=True):
        assert list(handle.result(timeout=120).token_ids) == reference.greedy(task, text, 10), (task, text)
    assert engine.compiled.eager_calls == 0  # every step ran at the thread count its graph was compiled for


def test_a_request_decoding_alone_runs_the_one_row_graph_and_gives_peft_tokens(compiling, make_engine, reference,
                                                                            monkeypatch):
    engine = make_engine(threads=torch.get_num_threads())
    assert engine.compiled is not None and engine.compiled.one_row is not None  # the tiny model's layers are packed
    opaque = []  # the opaque attention op's calls: the one-row graph traces its attention instead

    def counted(layout, *args):
        opaque.append(1)
        return _ORIGINAL_ATTEND(layout, *args)

    monkeypatch.setattr(attention.StepLayout, "attend", counted)
    before = engine.compiled.one_row_steps
    # 20 tokens: each request's history crosses a page (one graph for every length of history)
    for task, text in ((None, "the lazy dog"), ("prefix16", "select price from"), ("pt8", "café über 42")):
        params = SamplingParams(max_new_tokens=20, ignore_eos=True)
        result = engine.submit(EngineRequest(text, task=task, params=params)).result(timeout=60)
        assert list(result.token_ids) == reference.greedy(task, text, 20), task
    assert engine.compiled.one_row_steps - before == 3 * 19  # every step after each prefill
    assert len(opaque) == 3 * engine.runner.kv.num_layers  # the prefills' layers alone
    assert engine.compiled.eager_calls == 0


def test_without_a_cxx_compiler_the_engine_serves_eagerly_and_says_why(compiling, monkeypatch, make_engine,
                                                                         reference, caplog):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    caplog.set_level(logging.INFO, logger="server.engine")
    engine = make_engine()
    assert engine.compiled is None
    [line] = [r.getMessage() for r in caplog.records if "compiled step off" in r.getMessage()]
    assert "no C++ compiler found" in line
    text = "the quick brown fox"
    result = engine.submit(EngineRequest(text, task="prefix16", params=SamplingParams(max_new_tokens=6,
                                                                                      ignore_eos=True)))
    assert list(result.result(timeout=60).token_ids) == reference.greedy("prefix16", text, 6)


def test_calls_check_their_inputs_guards_not_the_models_unless_the_model_changes_itself():
    on_model = ["L['self'].config", "args[0]._modules['model']", "dict(type(L['args'][0].config).__mro__[1].__dict__)",
                "type(args[0])"]
    on_inputs = ["L['kwargs']['promptswap_layout']", "kwargs['input_ids']", "G['ONE_ROW']", "self_attention", "args[1]"]
    assert all(compiled._ON_MODEL.match(name) for name in on_model)
    assert not any(compiled._ON_MODEL.match(name) for name in on_inputs)
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny(**rope):
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, **rope))

    assert compiled._attributes_fixed(tiny())
    # a dynamic RoPE grows its cached length and scaling in forward: its guards stay
    assert not compiled._attributes_fixed(tiny(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                "rope_theta": 10000.0}))
