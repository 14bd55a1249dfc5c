"""`promptswap serve`: its flags, the settings they make, the offline demo, and a graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import fields

import httpx
import pytest
from pydantic import ValidationError

from server.config import ENGINE_FIELDS, Settings
from server.demo.random_demo import DEMO_TASKS, SOFT_PROMPT_TEXT
from server.engine.config import EngineConfig, describe_default
from server.process.cli import build_parser, main
from tests.api.conftest import stream_in_background
from tests.serve_process import start_serve_process


def test_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--prompt-dir", "--host", "--port", "--device", "--dtype", "--admin-token",
                 "--api-token", "--served-model-name", "--max-new-tokens-cap", "--max-running", "--max-queue",
                 "--max-context", "--kv-cache-bytes", "--prompt-cache-bytes", "--shutdown-timeout-s"):
        assert flag in out, flag
    assert "PROMPTSWAP_ADMIN_TOKEN" in out
    # Real defaults, or what decides them, never "the engine's own".
    flat = " ".join(out.split())
    assert "PROMPTSWAP_MAX_RUNNING; default: 64]" in flat and "PROMPTSWAP_MAX_QUEUE; default: 1024]" in flat
    assert "PROMPTSWAP_MAX_CONTEXT; default: the model's own limit]" in flat
    assert "engine's own" not in flat


@pytest.fixture(autouse=True)
def _a_users_environment(monkeypatch):
    """The settings read the environment as a user's shell has it: without the suite's PROMPTSWAP_COMPILE=false
    (tests/conftest.py)."""
    monkeypatch.delenv("PROMPTSWAP_COMPILE", raising=False)


def test_every_engine_setting_is_a_setting_and_a_flag_with_its_help(capsys, monkeypatch):
    """EngineConfig declares them once: each field is a Settings field (unset: the engine's default), a
    PROMPTSWAP_* variable and a `serve` flag, with the field's help and its default as describe_default says."""
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside the help: argparse would break at hyphens
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert tuple(f.name for f in fields(EngineConfig)) == ENGINE_FIELDS
    for f in fields(EngineConfig):
        setting = Settings.model_fields[f.name]
        assert setting.default is None and setting.description == f.metadata["help"], f.name
        flag, env = "--" + f.name.replace("_", "-"), f"PROMPTSWAP_{f.name.upper()}"
        # A switch reads --name, --no-name; any other flag takes a value.
        usage = f"{flag}, --no-{flag[2:]}" if f.type in (bool, "bool") else f"{flag} {f.name.upper()}"
        assert f"{usage} {f.metadata['help']} [env {env}; default: {describe_default(f.name)}]" in flat
        monkeypatch.setenv(env, "")  # empty: unset, the engine's default
        assert getattr(Settings(), f.name) is None and Settings().engine_config() == EngineConfig()
        if f.default is not None:
            monkeypatch.setenv(env, str(f.default))
            assert getattr(Settings(), f.name) == f.default and Settings().engine_config() == EngineConfig()
        monkeypatch.delenv(env)


A_NEW_ENGINE_FIELD = """
import contextlib, dataclasses, io, os
import server.engine.config as engine_config

@dataclasses.dataclass(frozen=True, slots=True)
class Wider(engine_config.EngineConfig):
    max_widgets: int = dataclasses.field(default=3, metadata={"help": "Most widgets at once (engine)."})

engine_config.EngineConfig = Wider  # as if EngineConfig had gained the field, before the settings are made
from server.process.cli import main
from server.config import Settings

out = io.StringIO()
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):
    main(["serve", "--help"])
flat = " ".join(out.getvalue().split())
assert "--max-widgets MAX_WIDGETS Most widgets at once (engine). [env PROMPTSWAP_MAX_WIDGETS; default: 3]" in flat, flat
os.environ["PROMPTSWAP_MAX_WIDGETS"] = "5"
assert Settings().engine_config().max_widgets == 5
assert Settings(max_widgets=None).engine_config().max_widgets == 3
"""


def test_a_field_added_to_engine_config_is_a_setting_with_no_other_edit():
    env = {**os.environ, "COLUMNS": "1000"}
    done = subprocess.run([sys.executable, "-c", A_NEW_ENGINE_FIELD], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr


HELP_WITHOUT_TORCH = """
import contextlib, io, sys
from server.process.cli import main
for argv in (["--help"], ["serve", "--help"], ["prompts", "--help"], ["prompts", "inspect", "--help"],
             ["prompts", "convert", "--help"], ["train", "--help"], ["model", "--help"], ["model", "path", "--help"],
             []):
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        main(argv)
assert "torch" not in sys.modules and "transformers" not in sys.modules, "--help imported torch"
"""


def test_help_of_every_command_never_imports_torch():
    # What makes `--help` take seconds is importing torch; measured as a fact, not a wall-clock time.
    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_bare_promptswap_lists_the_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "serve" in out and "prompts" in out and "promptswap serve" in out


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("PROMPTSWAP_PORT", "9001")
    monkeypatch.setenv("PROMPTSWAP_ADMIN_TOKEN", "from-env")
    monkeypatch.setenv("PROMPTSWAP_MAX_RUNNING", "3")
    args = build_parser().parse_args(["serve", "--port", "9002", "--model", "some/model"])
    settings = Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields})
    assert settings.port == 9002 and settings.model == "some/model"  # from flags
    assert settings.admin_token.get_secret_value() == "from-env" and settings.max_running == 3  # from env
    assert settings.engine_config() == EngineConfig(max_running=3)
    assert settings.model_name() == "model"
    monkeypatch.setenv("PROMPTSWAP_PREFIX_CACHING", "true")
    args = build_parser().parse_args(["serve", "--no-prefix-caching"])  # a switch of the engine's, off by flag
    settings = Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields})
    assert settings.engine_config() == EngineConfig(max_running=3, prefix_caching=False)


def test_threads_default_to_the_cores_this_process_may_use(capsys, monkeypatch):
    """--threads sets the engine's torch threads; unset, the engine takes usable_cpus(), which --help shows."""
    from server.machine.threads import usable_cpus

    monkeypatch.delenv("PROMPTSWAP_THREADS", raising=False)
    args = build_parser().parse_args(["serve", "--threads", "3"])
    settings = Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields})
    assert settings.threads == 3 and settings.engine_config() == EngineConfig(threads=3)
    assert Settings().engine_config().threads is None  # decided when the engine starts
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert (f"PROMPTSWAP_THREADS; default: the CPU cores this process may use: its CPU affinity, within its "
            f"cgroup's CPU quota ({usable_cpus()} here)]") in flat


def test_invalid_setting_is_a_clear_error(capsys):
    assert main(["serve", "--port", "99999"]) == 2
    err = capsys.readouterr().err
    assert "--port / PROMPTSWAP_PORT" in err and "99999" in err


@pytest.mark.parametrize(("flags", "named", "allowed"), [
    (["--max-tokens-per-step", "32"], "--max-tokens-per-step / PROMPTSWAP_MAX_TOKENS_PER_STEP", ">= max_running (64)"),
    (["--max-running", "0"], "--max-running / PROMPTSWAP_MAX_RUNNING", "an integer >= 1"),
    (["--max-context", "1"], "--max-context / PROMPTSWAP_MAX_CONTEXT", "an integer >= 2"),
    (["--threads", "-2"], "--threads / PROMPTSWAP_THREADS", "an integer >= 1"),
])
def test_engine_settings_are_checked_at_startup_naming_the_flag(capsys, flags, named, allowed):
    """The engine's own rules, applied when the settings are made: never 'the model could not be loaded'."""
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and allowed in err and "model" not in err.lower()


def test_engine_settings_from_the_environment_are_checked_too(monkeypatch):
    monkeypatch.setenv("PROMPTSWAP_MAX_QUEUE", "0")
    with pytest.raises(ValidationError, match="PROMPTSWAP_MAX_QUEUE"):
        Settings()


def test_random_demo_serves_two_tasks_offline(start_server, tmp_path):
    server = start_server(model="random-demo", cache_dir=tmp_path / "cache", prompt_dir=None)
    try:
        with server.client() as c:
            assert c.get("/health").json()["demo"] is True
            prompts = {p["task"]: p for p in c.get("/prompts").json()["prompts"]}
            assert set(DEMO_TASKS) <= set(prompts)
            assert prompts["demo-soft-prompt"]["kind"] == "prompt" and prompts["demo-prefix"]["kind"] == "prefix"
            assert c.get("/v1/models").json()["data"][0]["id"] == "promptswap-demo"
            # The soft prompt is the embeddings of SOFT_PROMPT_TEXT, so it continues like that text in front.
            with_task = c.post("/generate", json={"task": "demo-soft-prompt", "text": " cheese =>",
                                                  "max_new_tokens": 8, "ignore_eos": True}).json()
            spelled = c.post("/generate", json={"text": SOFT_PROMPT_TEXT + " cheese =>", "max_new_tokens": 8,
                                                "ignore_eos": True}).json()
            assert with_task["token_ids"] == spelled["token_ids"]
            prefix = c.post("/generate", json={"task": "demo-prefix", "text": "hi", "max_new_tokens": 3}).json()
            assert prefix["usage"]["virtual_tokens"] == 8
        assert (tmp_path / "cache" / "prompts" / "promptswap-demo" / "demo-prefix.safetensors").exists()
    finally:
        server.stop()


@pytest.mark.slow  # a serve process
def test_secrets_in_the_query_string_never_reach_the_access_log(llama_dir, tmp_path):
    proc, url = start_serve_process(llama_dir, tmp_path, "--log-level", "info", "--api-token", "api-secret")
    try:
        for path in ("/generate?access_token=SECRET-ONE&x=1", "/v1/models?api_key=SECRET-TWO"):
            assert httpx.post(f"{url}{path}", json={"text": "hi"}, timeout=30).status_code in (401, 405)
        assert httpx.get(f"{url}/health?token=SECRET-THREE", timeout=30).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert "SECRET-" not in out and "api-secret" not in out
    assert "access_token=[redacted]&x=1" in out and "token=[redacted]" in out  # the line itself is still there


@pytest.mark.slow  # a serve process
def test_sigterm_finishes_in_flight_streams_then_exits_zero(llama_dir, tmp_path):
    proc, url = start_serve_process(llama_dir, tmp_path, "--log-level", "warning")
    try:

        body = {"text": "hello", "max_new_tokens": 120, "ignore_eos": True, "stream": True}
        events, started, reader = stream_in_background(
            lambda: httpx.stream("POST", f"{url}/generate", timeout=60, json=body))
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert proc.wait(timeout=60) == 0
        # The request that was in flight when SIGTERM came finished whole.
        assert events[-1]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 120
        with pytest.raises(httpx.TransportError):  # and nothing listens any more
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
