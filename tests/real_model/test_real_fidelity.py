"""On real weights (SmolLM2-135M-Instruct): every prompt kind in one mixed batch gives PEFT's greedy tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)
from transformers import AutoModelForCausalLM

from prompt_store import PromptRegistry
from server.demo.smollm2 import chat_turn
from server.engine.admission import EngineRequest
from server.engine.config import EngineConfig
from server.engine.loop import Engine
from server.engine.sequence import SamplingParams
from server.model.model_loader import load_base_model
from tests.peft_reference import PeftReference

NEW_TOKENS = 8
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea.",
             "How many legs does a spider have?"]


def adapter_configs(model_dir) -> dict:
    causal = TaskType.CAUSAL_LM
    return {
        # text-initialised prompt tuning: the embeddings of an instruction, as PEFT makes them
        "text-init": PromptTuningConfig(task_type=causal, num_virtual_tokens=12,
                                        prompt_tuning_init=PromptTuningInit.TEXT,
                                        prompt_tuning_init_text="Answer in French, briefly.",
                                        tokenizer_name_or_path=str(model_dir)),
        "random-init": PromptTuningConfig(task_type=causal, num_virtual_tokens=6),
        "p-tuning": PromptEncoderConfig(task_type=causal, num_virtual_tokens=5, encoder_hidden_size=64),
        "prefix": PrefixTuningConfig(task_type=causal, num_virtual_tokens=7),
        "prefix-projection": PrefixTuningConfig(task_type=causal, num_virtual_tokens=4, prefix_projection=True,
                                                encoder_hidden_size=64),
    }


@pytest.fixture(scope="module")
def adapters(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-adapters")
    out = {}
    for seed, (name, config) in enumerate(adapter_configs(smollm2_dir).items()):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir), copy.deepcopy(config))
        model.save_pretrained(str(root / name))
        out[name] = root / name
    return out


def test_mixed_batch_of_every_kind_matches_peft_on_real_weights(smollm2_dir, adapters, tmp_path):
    base = load_base_model(smollm2_dir)
    registry = PromptRegistry(base.geometry, tmp_path / "prompts", dtype=base.dtype)
    for name, path in adapters.items():
        registry.put_path(name, path)
    engine = Engine(base, registry, EngineConfig(max_running=16, max_tokens_per_step=64))
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        tasks = [None, *adapters]
        requests = [(task, chat_turn(QUESTIONS[i % len(QUESTIONS)])) for i, task in enumerate(tasks * 2)]
        handles = [engine.submit(EngineRequest(text, task=task, params=params)) for task,
                   text in requests]  # one mixed batch
        got = [list(h.result(timeout=300).token_ids) for h in handles]
    finally:
        engine.shutdown(timeout_s=5)
    reference = PeftReference(smollm2_dir)
    for (task, text), tokens in zip(requests, got, strict=True):
        adapter = None if task is None else adapters[task]
        assert tokens == reference.greedy(adapter, text, NEW_TOKENS), (task, text)
    # the adapters really steer the model: not every task answers the same question alike
    first_question = {task: tokens for (task, text), tokens in zip(requests, got, strict=True)
                      if text == chat_turn(QUESTIONS[0])}
    assert len({tuple(t) for t in first_question.values()}) > 1
