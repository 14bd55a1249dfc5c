"""Real PEFT adapters on the tiny models, the PEFT reference, and engines over a real registry."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from peft import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from transformers import AutoModelForCausalLM

from prompt_store import ModelGeometry, PromptRegistry
from server.engine.config import EngineConfig
from server.engine.loop import Engine
from server.model.model_loader import load_base_model
from tests.peft_reference import PeftReference

# task name -> PEFT config; num_virtual_tokens spans 1..64, every method, prefixes with and without projection
ADAPTERS = {
    "pt1": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=1),
    "pt8": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8),
    "pt64": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=64),
    "ptune5": PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5, encoder_hidden_size=32),
    "prefix1": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=1),
    "prefix16": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=16),
    "prefix64proj": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=64, prefix_projection=True,
                                       encoder_hidden_size=32),
}

WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "prompt", "prefix", "tuning", "café", "über",
    "東京", "select", "from", "where", "price", "model", "server", "batch", "token", "42", "3.14", "translate",
]


def make_adapter(model_dir, config, out_dir, seed: int):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, copy.deepcopy(config))  # get_peft_model fills the config in
    peft_model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def adapter_dirs(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"adapters-{model_dir.name}")
    return {task: make_adapter(model_dir, cfg, root / task, seed=i) for i, (task, cfg) in enumerate(ADAPTERS.items())}


class Reference:
    """The shared PEFT reference (tests/peft_reference.py), with the adapters named by task."""

    def __init__(self, model_dir, adapter_dirs):
        self.peft = PeftReference(model_dir)
        self.adapter_dirs = adapter_dirs

    def greedy(self, task, text: str, max_new_tokens: int) -> list[int]:
        return self.peft.greedy(None if task is None else self.adapter_dirs[task], text, max_new_tokens)


@pytest.fixture(scope="session")
def reference(model_dir, adapter_dirs):
    return Reference(model_dir, adapter_dirs)


@pytest.fixture(scope="session")
def base_model(model_dir):
    return load_base_model(model_dir)


@pytest.fixture
def registry(base_model, adapter_dirs, tmp_path):
    reg = PromptRegistry(ModelGeometry.from_config(base_model.model.config), tmp_path / "prompts",
                         dtype=base_model.dtype)
    for task, path in adapter_dirs.items():
        reg.put_path(task, path)
    return reg


@pytest.fixture
def make_engine(base_model, registry):
    engines = []

    def make(**config):
        engine = Engine(base_model, registry, EngineConfig(**config))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(timeout_s=5)


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))
