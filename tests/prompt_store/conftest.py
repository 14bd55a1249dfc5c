"""Real PEFT adapters on the tiny models, and small helpers to build prompt files by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from prompt_store import ModelGeometry


def _peft_config(method: str):
    """Method name -> PEFT config. A different n per method, so a mix-up cannot pass unnoticed."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    causal = TaskType.CAUSAL_LM
    return {
        "prompt_tuning": lambda: PromptTuningConfig(task_type=causal, num_virtual_tokens=5),
        "p_tuning": lambda: PromptEncoderConfig(task_type=causal, num_virtual_tokens=4, encoder_hidden_size=16),
        "prefix": lambda: PrefixTuningConfig(task_type=causal, num_virtual_tokens=3),
        "prefix_projection": lambda: PrefixTuningConfig(
            task_type=causal, num_virtual_tokens=6, prefix_projection=True, encoder_hidden_size=16
        ),
    }[method]()


@pytest.fixture(scope="session")
def geometries(llama_dir, gpt2_dir):
    from transformers import AutoConfig

    return {
        arch: ModelGeometry.from_config(AutoConfig.from_pretrained(d), model_name=str(d))
        for arch, d in (("llama", llama_dir), ("gpt2", gpt2_dir))
    }


@pytest.fixture
def geometry(model_dir, geometries, llama_dir):
    return geometries["llama" if model_dir == llama_dir else "gpt2"]


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory, llama_dir, gpt2_dir):
    """make_adapter(model_dir, method, legacy=False) -> (adapter dir, the tensor PEFT saves). Cached."""
    cache: dict = {}

    def make(model_dir: Path, method: str, legacy: bool = False):
        key = (str(model_dir), method, legacy)
        if key not in cache:
            from peft import get_peft_model
            from transformers import AutoModelForCausalLM

            torch.manual_seed(len(cache) + 1)
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)), _peft_config(method))
            out = tmp_path_factory.mktemp(f"adapter-{method}")
            model.save_pretrained(str(out), safe_serialization=not legacy)
            cache[key] = (out, model.get_prompt_embedding_to_save("default"))
        return cache[key]

    return make


# The geometry of the tiny Llama: hidden 64, 2 layers, 2 kv heads of 16 -> a prefix is 128 wide.
TINY = ModelGeometry(hidden_size=64, num_layers=2, num_kv_heads=2, head_dim=16, model_name="tiny")


@pytest.fixture
def tiny_geometry() -> ModelGeometry:
    return TINY


def prompt_file(tensor: torch.Tensor, **metadata: str) -> bytes:
    return save({"prompt_embeddings": tensor.contiguous()}, metadata=metadata or None)


@pytest.fixture
def make_file():
    """make_file(tensor, **metadata) -> safetensors bytes holding `prompt_embeddings`."""
    return prompt_file


@pytest.fixture
def prompt_config():
    """prompt_config(kind, n, **overrides) -> a PEFT adapter_config dict for the tiny geometry."""

    def make(kind: str = "prompt", n: int = 4, **overrides) -> dict:
        if kind == "prompt":
            cfg = {"peft_type": "PROMPT_TUNING", "token_dim": 64, "num_attention_heads": 4}
        else:
            cfg = {"peft_type": "PREFIX_TUNING", "token_dim": 32, "num_attention_heads": 2}
        cfg.update(task_type="CAUSAL_LM", num_virtual_tokens=n, num_layers=2, num_transformer_submodules=1)
        cfg.update(overrides)
        return json.loads(json.dumps(cfg))

    return make
