"""--quantize int8-weight-only (server/model/quantize.py): opt-in, served through every task kind, never the default.

No timing is asserted here (benchmarks/precision.py measures speed and agreement on the real demo weights)."""

from __future__ import annotations

import pytest
import torch

from prompt_store import PromptRegistry
from server.demo.tiny_models import build_tiny_model
from server.engine.admission import EngineRequest
from server.engine.config import EngineConfig
from server.engine.errors import ModelNotSupported
from server.engine.loop import Engine
from server.engine.sequence import SamplingParams
from server.model import quantize
from server.model.model_loader import load_base_model
from tests.engine.conftest import ADAPTERS, make_adapter

INT8 = "int8-weight-only"
GREEDY8 = SamplingParams(max_new_tokens=8, ignore_eos=True)


def is_int8(weight: torch.Tensor) -> bool:
    return type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8


def test_the_default_load_is_float32_and_not_quantized(llama_dir):
    base = load_base_model(llama_dir)
    assert base.dtype == torch.float32 and base.quantize == "none"
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in base.model.parameters())


def test_int8_weight_only_serves_soft_prompt_and_prefix_tasks(llama_dir, tmp_path):
    pytest.importorskip(quantize.LIBRARY)
    base = load_base_model(llama_dir, quantize=INT8)
    assert base.quantize == INT8 and base.dtype == torch.float32
    linears = [m for m in base.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(is_int8(m.weight) for m in linears)  # the tiny llama's head is untied: quantized too
    embeddings = base.model.get_input_embeddings().weight  # what the soft prompts are concatenated with
    assert type(embeddings) is torch.nn.Parameter and embeddings.dtype == torch.float32
    registry = PromptRegistry(base.geometry, tmp_path / "prompts", dtype=base.dtype)
    for i, task in enumerate(("pt8", "prefix16")):
        registry.put_path(task, make_adapter(llama_dir, ADAPTERS[task], tmp_path / task, seed=i))
    engine = Engine(base, registry, EngineConfig(max_running=4))
    engine.start()
    try:
        handles = {task: engine.submit(EngineRequest("the quick brown fox", task=task, params=GREEDY8))
                   for task in ("pt8", "prefix16", None)}
        for handle in handles.values():
            done = handle.result(timeout=60)
            assert len(done.token_ids) == 8 and done.usage.completion_tokens == 8
        assert engine.stats().prompt_cache_misses >= 2  # both tasks' prefixes went through the int8 model
    finally:
        engine.shutdown(timeout_s=5)


def test_a_tied_output_head_stays_the_embedding_table(tmp_path):
    pytest.importorskip(quantize.LIBRARY)
    base = load_base_model(build_tiny_model(tmp_path / "tied", tie_word_embeddings=True), quantize=INT8)
    model = base.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not is_int8(model.get_output_embeddings().weight)
    assert all(is_int8(m.weight) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings())


def test_a_model_without_linear_layers_is_refused(gpt2_dir):
    pytest.importorskip(quantize.LIBRARY)
    with pytest.raises(ModelNotSupported, match=r"no torch\.nn\.Linear layer"):
        load_base_model(gpt2_dir, quantize=INT8)  # GPT-2's layers are Conv1D and its head is tied


def test_a_missing_library_is_one_clear_error(llama_dir, monkeypatch):
    monkeypatch.setattr(quantize, "available", lambda method: method == "none")
    with pytest.raises(quantize.QuantizerMissing) as caught:
        load_base_model(llama_dir, quantize=INT8)
    assert str(caught.value) == ('--quantize int8-weight-only needs torchao, which is not installed; install it: '
                                 'pip install "promptswap[quantize]" (torchao)')


def test_an_unknown_method_or_a_device_map_is_refused(llama_dir):
    with pytest.raises(ValueError, match="quantize must be one of none, int8-weight-only, got 'int4'"):
        load_base_model(llama_dir, quantize="int4")
    with pytest.raises(ValueError, match="not one spread by a device map"):
        load_base_model(llama_dir, quantize=INT8, device_map="auto")
