"""Beyond the two reference architectures: every attention variant transformers routes through
its AttentionInterface (GQA, MQA, biases, partial rotary, QK norms, logit softcap, sliding
window, learned positions) gives the PEFT reference's greedy tokens for a base request, a soft
prompt and a prefix."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from prompt_store import ModelGeometry, PromptRegistry
from server.demo.tiny_models import build_tokenizer
from server.engine.admission import EngineRequest
from server.engine.config import EngineConfig
from server.engine.loop import Engine
from server.engine.sequence import SamplingParams
from server.model.model_loader import load_base_model
from tests.peft_reference import greedy, load_reference

pytestmark = pytest.mark.slow  # eight more architectures; the quick tier keeps the tiny Llama

SHAPE = dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, initializer_range=0.2)
GQA = dict(num_key_value_heads=2)
ARCHITECTURES = {
    "qwen2": GQA,  # q/k/v biases
    "qwen3": dict(GQA, head_dim=16),  # QK norms
    "mistral-sliding-window": dict(GQA, sliding_window=6),  # windows shorter than the prompt plus text
    "gemma2": dict(GQA, head_dim=16, sliding_window=6),  # logit softcap, alternating sliding layers
    "phi": {},  # partial rotary
    "gpt_neox": {},
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, multi_query=True),  # one kv head
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),  # learned positions with an offset
}
ADAPTERS = {
    "soft": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
    "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
}
TEXTS = ["the quick brown fox jumps", "Café über 東京", "SELECT name FROM products WHERE price > 10",
         "Summarize: the meeting moved to Thursday because the room was booked on Wednesday. " * 2]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_matches_peft(name, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_type = name.split("-")[0]
    config = AutoConfig.for_model(model_type, **{**SHAPE, **ARCHITECTURES[name]})
    config.eos_token_id = config.bos_token_id = config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    for task, peft_config in ADAPTERS.items():
        torch.manual_seed(1)
        get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path), copy.deepcopy(peft_config)).save_pretrained(
            tmp_path / task)

    base = load_base_model(tmp_path)
    # The model directory's tokenizer, as the engine loads it: for some model types AutoTokenizer
    # picks that type's tokenizer class, which splits text differently from the saved one.
    tokenizer = base.tokenizer
    registry = PromptRegistry(ModelGeometry.from_config(base.model.config), tmp_path / "prompts", dtype=base.dtype)
    for task in ADAPTERS:
        registry.put_path(task, tmp_path / task)
    # a small step budget: long texts prefill in chunks, across the sliding windows
    engine = Engine(base, registry, EngineConfig(max_running=12, max_tokens_per_step=24))
    engine.start()
    try:
        # every task's requests go in together, so each batch mixes kinds
        handles = {(task, text): engine.submit(EngineRequest(text, task=task,
                                                             params=SamplingParams(max_new_tokens=NEW_TOKENS,
                                                                                       ignore_eos=True)))
                   for task in [None, *ADAPTERS] for text in TEXTS}
        for task in [None, *ADAPTERS]:
            reference = load_reference(tmp_path, None if task is None else tmp_path / task)
            for text in TEXTS:
                got = list(handles[task, text].result(timeout=60).token_ids)
                assert got == greedy(reference, list(tokenizer(text)["input_ids"]), NEW_TOKENS), (name, task, text)
    finally:
        engine.shutdown(timeout_s=5)
