"""--read-only-prompts: a fixed task set is served as it is; writes answer 405 before the body is read, and
the prompt directory need not be writable."""

from __future__ import annotations

import torch
from safetensors.torch import save

from server.config import Settings
from server.process.startup import StartupError, check_readable_prompt_dir


def test_a_fixed_task_set_is_served_and_writes_are_refused(start_server, llama_dir, tmp_path):
    prompts = tmp_path / "fixed"
    prompts.mkdir()
    (prompts / "fixed-task.safetensors").write_bytes(
        save({"prompt_embeddings": torch.randn(3, 64)}, metadata={"kind": "prompt"}))
    server = start_server(model=str(llama_dir), prompt_dir=prompts, read_only_prompts=True)
    with server.client() as c:
        assert c.get("/prompts/fixed-task").status_code == 200
        r = c.post("/generate", json={"task": "fixed-task", "text": "hello", "max_new_tokens": 2})
        assert r.status_code == 200
        for method, path in (("PUT", "/prompts/new"), ("PUT", "/prompts"), ("PATCH", "/prompts/fixed-task"),
                             ("DELETE", "/prompts/fixed-task")):
            r = c.request(method, path, content=b"x" * 10, headers={"content-type": "application/octet-stream"})
            assert r.status_code == 405, (method, path, r.text)
            assert r.json()["error"]["param"] == "method" and r.headers["allow"] == "GET, HEAD, OPTIONS"
        assert sorted(p.name for p in prompts.iterdir()) == ["fixed-task.safetensors"]  # nothing written
    server.stop()


def test_startup_needs_a_readable_directory_only(tmp_path):
    check_readable_prompt_dir(tmp_path)
    try:
        check_readable_prompt_dir(tmp_path / "missing")
    except StartupError as exc:
        assert "cannot be read" in str(exc) or "does not exist" in str(exc)
    else:
        raise AssertionError("a missing directory must stop the start")
    assert Settings(read_only_prompts=True).read_only_prompts
