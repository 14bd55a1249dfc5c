"""An adapter's recorded base model (issue 11): kept and shown; one that plainly names another model is
stored with a warning (and one log line), or refused with --strict-base-model, naming both."""

from __future__ import annotations

import json
import logging

from prompt_store.validate import model_key
from tests.api.conftest import upload_multipart

OTHER = "meta-llama/Meta-Llama-3-8B"


def _adapter_for(adapter_dir, base_model: str, tmp_path):
    """The same PEFT adapter with its config's base_model_name_or_path set to `base_model`."""
    out = tmp_path / f"adapter-{model_key(base_model)}"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base_model}))
    return out


def test_model_key_is_the_last_component_case_insensitively():
    assert model_key("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert model_key("/models/SmolLM2-135M-Instruct/") == model_key("smollm2-135m-instruct")
    assert model_key("C:\\models\\Llama") == "llama"


def test_another_models_adapter_is_stored_with_a_warning(llama_server, adapters, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="prompt_store.registry")
    with llama_server.client() as c:
        r = upload_multipart(c, "own-model", adapters["prompt_tuning"])  # PEFT recorded the served path
        assert r.status_code == 201 and r.json()["warnings"] == []
        r = upload_multipart(c, "for-llama3", _adapter_for(adapters["prompt_tuning"], OTHER, tmp_path))
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["base_model"] == OTHER and len(body["warnings"]) == 1 and OTHER in body["warnings"][0]
        assert c.get("/prompts/for-llama3").json()["warnings"] == body["warnings"]  # kept and shown
    lines = [rec for rec in caplog.records if "for-llama3" in rec.getMessage()]
    assert len(lines) == 1 and OTHER in lines[0].getMessage()


def test_strict_base_model_refuses_it_naming_both(start_server, llama_dir, adapters, tmp_path):
    server = start_server(model=str(llama_dir), strict_base_model=True)
    try:
        with server.client() as c:
            assert upload_multipart(c, "own-model", adapters["prefix"]).status_code == 201
            r = upload_multipart(c, "for-llama3", _adapter_for(adapters["prefix"], OTHER, tmp_path))
            assert r.status_code == 422 and r.json()["error"]["param"] == "config"
            message = r.json()["error"]["message"]
            assert OTHER in message and model_key(str(llama_dir)) in message
            assert c.get("/prompts/for-llama3").status_code == 404
    finally:
        server.stop()
