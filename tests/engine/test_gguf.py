"""GGUF checkpoints: converted once into a model directory (cached by content), exact, and served like any model."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM

from prompt_store import PromptRegistry
from server.engine.admission import EngineRequest
from server.engine.config import EngineConfig
from server.engine.loop import Engine
from server.engine.sequence import SamplingParams
from server.model.build_once import COMPLETE_MARKER
from server.model.gguf import converted_dir
from server.model.model_loader import load_base_model
from tests.gguf_files import write_tiny_qwen2_gguf
from tests.peft_reference import PeftReference


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_qwen2_gguf(tmp_path_factory.mktemp("gguf"))


def test_a_float_gguf_converts_to_the_same_model(tiny_gguf, tmp_path):
    path, original = tiny_gguf
    model_dir = converted_dir(path, tmp_path)
    assert (model_dir / COMPLETE_MARKER).exists() and model_dir.parent == tmp_path / "models"
    base = load_base_model(model_dir)
    assert base.model.config.model_type == "qwen2"
    ids = torch.tensor([base.tokenizer("the quick brown fox jumps")["input_ids"]])
    with torch.inference_mode():
        converted = AutoModelForCausalLM.from_pretrained(model_dir).eval()(ids).logits
        assert torch.equal(converted, original(ids).logits)  # float32 in, float32 out: bit for bit


def test_conversion_is_cached_by_the_files_content(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    first = converted_dir(path, tmp_path)
    stamp = (first / COMPLETE_MARKER).stat().st_mtime_ns
    moved = tmp_path / "elsewhere" / "renamed.gguf"
    moved.parent.mkdir()
    shutil.copy(path, moved)
    assert converted_dir(path, tmp_path) == first and (first / COMPLETE_MARKER).stat().st_mtime_ns == stamp
    assert converted_dir(moved, tmp_path).name.split("-")[-1] == first.name.split("-")[-1]  # same bytes, same digest
    other, _ = write_tiny_qwen2_gguf(tmp_path / "other", seed=1)
    assert converted_dir(other, tmp_path).name.split("-")[-1] != first.name.split("-")[-1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        converted_dir(tmp_path / "missing.gguf", tmp_path)


def test_a_converted_gguf_serves_soft_prompts_and_prefixes_like_peft(tiny_gguf, tmp_path):
    model_dir = converted_dir(tiny_gguf[0], tmp_path)
    adapters = {"soft": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5),
                "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)}
    for task, config in adapters.items():
        torch.manual_seed(3)
        get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), copy.deepcopy(config)).save_pretrained(
            tmp_path / task)
    base = load_base_model(model_dir)
    registry = PromptRegistry(base.geometry, tmp_path / "prompts", dtype=base.dtype)
    for task in adapters:
        registry.put_path(task, tmp_path / task)
    engine = Engine(base, registry, EngineConfig(max_running=8, max_tokens_per_step=16))
    engine.start()
    try:
        texts = ["the quick brown fox", "SELECT name FROM products WHERE price > 10"]
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        handles = {(t, x): engine.submit(EngineRequest(x, task=t, params=params)) for t in [None, *adapters]
                   for x in texts}
        got = {key: list(h.result(timeout=60).token_ids) for key, h in handles.items()}
    finally:
        engine.shutdown(timeout_s=5)
    reference = PeftReference(model_dir)
    for (task, text), tokens in got.items():
        assert tokens == reference.greedy(None if task is None else tmp_path / task, text, 6), (task, text)


def test_the_converted_directory_names_its_file_and_a_read_only_one_still_serves(tiny_gguf, tmp_path, monkeypatch):
    from server.model import gguf as gguf_module

    path, _ = tiny_gguf
    model_dir = converted_dir(path, tmp_path)
    assert gguf_module.source_of(model_dir) == path.resolve()  # what --quantize gguf reads the blocks from
    moved = tmp_path / "elsewhere" / path.name  # the same name and bytes: the same directory
    moved.parent.mkdir()
    shutil.copy(path, moved)
    assert converted_dir(moved, tmp_path) == model_dir and gguf_module.source_of(model_dir) == moved.resolve()

    def read_only(*args):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(gguf_module.os, "replace", read_only)
    assert converted_dir(path, tmp_path) == model_dir  # served as it is; the name stays the last one written
    assert gguf_module.source_of(model_dir) == moved.resolve()
