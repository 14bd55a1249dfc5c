"""`promptswap serve` while its model loads: the port answers at once (/health and /ready 503 `starting`,
generation 503 `starting_error` with Retry-After), a SIGTERM then exits 0 without a traceback, a load that
fails ends the process with one `cannot start:` line and exit status 3; and a first start that converts a
GGUF file with `--log-format json` writes nothing but JSON lines.

The load is held back without touching the server's code: a `sitecustomize` module on PYTHONPATH (Python
imports it at startup) wraps `server.model.model_source.model_source`, the load's first step, so that it waits
until the test creates a gate file.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.serve_process import launch_serve_process, start_serve_process

pytestmark = pytest.mark.slow  # every test starts a `promptswap serve` process

GATE_HOOK = """
import os, pathlib, time
import server.model.model_source as source

_original = source.model_source
_gate = pathlib.Path(os.environ["TEST_LOAD_GATE"])


def model_source(settings):
    _gate.with_suffix(".waiting").touch()  # the load has begun and is held here
    while not _gate.exists():
        time.sleep(0.05)
    return _original(settings)


source.model_source = model_source
"""


def _gated_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GATE_HOOK)
    gate = tmp_path / "gate"
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "TEST_LOAD_GATE": str(gate)}, gate


def _first_answer(proc, url: str, timeout_s: float = 10) -> httpx.Response:
    """/health's first answer, once the load has begun: uvicorn serves as soon as the lifespan has started it
    (with the load in the lifespan, never); a refused or unanswered connection is retried until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(f"{url}/health", timeout=2)
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server never answered"
            time.sleep(0.1)


def _wait_for(path: Path, proc, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def _stop(proc) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_health_answers_starting_at_once_while_the_model_loads(llama_dir, tmp_path):
    env, gate = _gated_env(tmp_path)
    proc, url = launch_serve_process(llama_dir, tmp_path, "--log-level", "warning", env=env)
    try:
        _wait_for(gate.with_suffix(".waiting"), proc)  # the load is under way, and held
        assert _first_answer(proc, url).status_code == 503
        for _ in range(3):  # a probe with a short timeout gets its answer, every time
            health = httpx.get(f"{url}/health", timeout=1)
            assert health.status_code == 503 and health.json() == {"status": "unavailable", "reason": "starting"}
        ready = httpx.get(f"{url}/ready", timeout=1)
        assert ready.status_code == 503 and ready.json()["reason"] == "starting"
        for method, path, body in (("POST", "/generate", {"text": "hi", "max_new_tokens": 2}),
                                   ("POST", "/v1/completions", {"model": "x", "prompt": "hi"}),
                                   ("GET", "/prompts", None)):
            r = httpx.request(method, f"{url}{path}", json=body, timeout=1)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["type"] == "starting_error" and "starting" in r.json()["error"]["message"]
            assert r.headers["retry-after"] == "5"
        assert httpx.get(f"{url}/metrics", timeout=1).status_code == 200  # scraped meanwhile too

        gate.touch()  # let the load go on
        deadline = time.monotonic() + 120
        while (health := httpx.get(f"{url}/health", timeout=5)).status_code != 200:
            assert health.json()["reason"] == "starting" and time.monotonic() < deadline
            time.sleep(0.1)
        assert health.json()["status"] == "ok" and "reason" not in health.json()
        assert httpx.get(f"{url}/ready", timeout=5).status_code == 200
        r = httpx.post(f"{url}/generate", json={"text": "hi", "max_new_tokens": 2, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out


def test_sigterm_while_the_model_loads_exits_zero_without_a_traceback(llama_dir, tmp_path):
    env, gate = _gated_env(tmp_path)
    proc, url = launch_serve_process(llama_dir, tmp_path, env=env)
    try:
        _wait_for(gate.with_suffix(".waiting"), proc)
        assert _first_answer(proc, url).status_code == 503
        proc.send_signal(signal.SIGTERM)  # the load never finishes: the gate stays shut
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "stopped before the model finished loading" in out


def test_a_model_that_fails_to_load_ends_the_process_with_one_line(tmp_path):
    from transformers import AutoConfig

    model = tmp_path / "no-weights"  # passes the startup checks (a config of a served architecture)
    AutoConfig.for_model("llama", vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64).save_pretrained(model)
    proc, _ = launch_serve_process(model, tmp_path)
    try:
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, out  # what uvicorn answers a failed startup with, as before
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "promptswap: cannot start: OSError: " in errors[0], out
    assert "no-weights" in errors[0] and "Traceback" not in out


def test_a_first_start_that_converts_a_gguf_file_writes_only_json_lines(tmp_path):
    """The conversion's progress bar (transformers' GGUF reader uses plain tqdm) used to reach stderr between
    the JSON lines."""
    from tests.gguf_files import write_tiny_qwen2_gguf

    gguf, _ = write_tiny_qwen2_gguf(tmp_path / "gguf")
    flags = ("--log-format", "json", "--log-level", "info", "--cache-dir", str(tmp_path / "fresh-cache"))
    proc, url = start_serve_process(gguf, tmp_path, *flags)
    try:
        assert httpx.post(f"{url}/generate", json={"text": "hi", "max_new_tokens": 2}, timeout=60).status_code == 200
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out
    records = []
    lines = out.splitlines()  # stdout and stderr together (a bar's \r reads as a line end here)
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"line {i} is not JSON: {line[:200]!r}, then {lines[i + 1:i + 2]!r}")
    messages = [r["message"] for r in records]
    assert any(m.startswith("converting ") and "dequantizing GGUF" in m for m in messages)  # on this start
    assert any(m.startswith("promptswap ready") for m in messages)
