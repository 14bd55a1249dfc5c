"""PEFT interop, both ways, with real adapters made by get_peft_model on the tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from prompt_store import PromptRegistry, peft_adapter_config, read_peft_dir

# The methods the `make_adapter` fixture knows, and the kind each is served as.
KIND_OF = {"prompt_tuning": "prompt", "p_tuning": "prompt", "prefix": "prefix", "prefix_projection": "prefix"}
METHODS = tuple(KIND_OF)


@pytest.mark.parametrize("method", METHODS)
def test_peft_directory_loads_as_peft_holds_it(model_dir, geometry, make_adapter, method, tmp_path):
    adapter, expected = make_adapter(model_dir, method)
    registry = PromptRegistry(geometry, tmp_path)
    snap, created = registry.put_path("task", adapter, description="from peft")
    assert created
    assert snap.kind == KIND_OF[method]
    assert snap.num_virtual_tokens == expected.shape[0]
    assert snap.embeddings.shape[1] == geometry.width_for(snap.kind)
    assert torch.equal(snap.embeddings, expected)
    assert snap.source == "peft" and snap.base_model == str(model_dir)
    assert snap.description == "from peft"


@pytest.mark.parametrize("method", METHODS)
def test_bare_weights_plus_config(model_dir, geometry, make_adapter, method):
    adapter, expected = make_adapter(model_dir, method)
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    config_bytes = (adapter / "adapter_config.json").read_bytes()
    registry = PromptRegistry(geometry)
    for config in (config_bytes, json.loads(config_bytes)):
        snap, _ = registry.put("task", weights, config=config)
        assert snap.kind == KIND_OF[method] and snap.source == "peft"
        assert torch.equal(snap.embeddings, expected)


@pytest.mark.parametrize("method", METHODS)
def test_bare_peft_weights_without_config_take_kind_from_shape(model_dir, geometry, make_adapter, method):
    adapter, expected = make_adapter(model_dir, method)
    snap, _ = PromptRegistry(geometry).put("task", (adapter / "adapter_model.safetensors").read_bytes())
    assert snap.kind == KIND_OF[method] and snap.source == "file"
    assert torch.equal(snap.embeddings, expected)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_projection"])
def test_legacy_adapter_model_bin(model_dir, geometry, make_adapter, method):
    adapter, expected = make_adapter(model_dir, method, legacy=True)
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / "adapter_model.safetensors").exists()
    snap, _ = PromptRegistry(geometry).put_path("task", adapter)
    assert snap.kind == KIND_OF[method]
    assert torch.equal(snap.embeddings, expected)


def test_adapter_for_another_model_is_refused(llama_dir, geometries, make_adapter):
    from prompt_store import WidthMismatch

    adapter, _ = make_adapter(llama_dir, "prefix")  # 2 layers * 2 * kv_dim 32 = 128; GPT-2 needs 256
    with pytest.raises(WidthMismatch, match="256 wide"):
        PromptRegistry(geometries["gpt2"]).put_path("task", adapter)


def test_peft_dir_without_config_or_weights(geometry, tmp_path):
    from prompt_store import MalformedFile

    registry = PromptRegistry(geometry)
    with pytest.raises(MalformedFile, match=r"adapter_config\.json") as info:
        registry.put_path("task", tmp_path)
    assert info.value.param == "config"
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}')
    with pytest.raises(MalformedFile, match=r"adapter_model\.safetensors or adapter_model\.bin"):
        registry.put_path("task", tmp_path)
    with pytest.raises(MalformedFile, match="neither a file nor"):
        registry.put_path("task", tmp_path / "nowhere")


@pytest.mark.parametrize("method", METHODS)
def test_promptswap_file_loads_into_peft(model_dir, geometry, make_adapter, method, tmp_path):
    """A stored file + peft_adapter_config is a PEFT adapter holding the same tensor."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, expected = make_adapter(model_dir, method)
    registry = PromptRegistry(geometry, tmp_path / "prompts")
    snap, _ = registry.put_path("task", adapter)

    export = tmp_path / "export"
    export.mkdir()
    (export / "adapter_model.safetensors").write_bytes((tmp_path / "prompts" / "task.safetensors").read_bytes())
    config = peft_adapter_config(snap.kind, snap.num_virtual_tokens, geometry, base_model=str(model_dir))
    (export / "adapter_config.json").write_text(json.dumps(config))

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(export))
    assert torch.equal(peft_model.get_prompt_embedding_to_save("default"), expected)
    # ... and the exported directory reads back through the registry as the same prompt.
    assert torch.equal(read_peft_dir(export, max_bytes=1 << 20).embeddings, snap.embeddings)
    again, _ = registry.put_path("again", export)
    assert again.sha256 == snap.sha256 and again.kind == snap.kind
