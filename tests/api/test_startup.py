"""`promptswap serve` fails fast and clearly (issue 11): the port, the prompt directory and the model are
checked before the model loads; each mistake is one line naming the cause and the fix, and exit 1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # most tests start a `promptswap serve` process


def serve(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPTSWAP_", "HF_HUB_OFFLINE"))}
    return subprocess.run([sys.executable, "-m", "server.process.cli", "serve", *flags], capture_output=True, text=True,
                          timeout=120, env={**base, **(env or {})})


def one_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert lines[0].startswith("promptswap serve: cannot start: ") and "; " in lines[0]  # the cause; the fix
    return lines[0]


def test_a_missing_model_directory(tmp_path):
    line = one_line(serve("--model", str(tmp_path / "no-such-model"), "--prompt-dir", str(tmp_path / "p")))
    assert "does not exist" in line and "no-such-model" in line and "hub id" in line


def test_a_directory_that_is_no_model(tmp_path):
    line = one_line(serve("--model", str(tmp_path), "--prompt-dir", str(tmp_path / "p")))
    assert "has no config.json" in line


def test_an_unreachable_or_unknown_hub_id(tmp_path):
    flags = ("--model", "promptswap-tests/no-such-model", "--prompt-dir", str(tmp_path / "p"),
             "--cache-dir", str(tmp_path / "cache"))
    line = one_line(serve(*flags, env={"HF_HOME": str(tmp_path / "hf")}))
    assert "cannot reach the Hugging Face hub" in line or "has no model" in line
    line = one_line(serve(*flags, env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}))
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in line


def test_a_port_in_use_is_found_before_the_model_loads(llama_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve("--model", str(llama_dir), "--port", str(port), "--prompt-dir", str(tmp_path / "p"))
    line = one_line(done)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line


def test_an_unwritable_prompt_directory(llama_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = one_line(serve("--model", str(llama_dir), "--prompt-dir", str(blocker / "prompts")))
    assert "prompt directory" in line and "not writable" in line and "--prompt-dir" in line
    assert "model" not in line.split(";")[0]  # the cause is the directory, not the model


@pytest.mark.parametrize("model_type", ["falcon", "t5"])
def test_an_unsupported_architecture_is_one_clear_line(tmp_path, model_type):
    from transformers import AutoConfig

    kw = {"d_model": 32, "num_layers": 1, "num_heads": 2} if model_type == "t5" else \
        {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    AutoConfig.for_model(model_type, vocab_size=100, **kw).save_pretrained(tmp_path / "model")
    line = one_line(serve("--model", str(tmp_path / "model"), "--prompt-dir", str(tmp_path / "p")))
    assert f"({model_type})" in line and "decoder-only causal LM" in line
    assert "'promptswap'" not in line  # not a KeyError's text


def test_a_second_server_on_the_same_port_fails_at_its_own_check():
    from server.process.startup import StartupError, bind

    first = bind("127.0.0.1", 0)
    try:
        with pytest.raises(StartupError, match="cannot listen on"):
            bind("127.0.0.1", first.getsockname()[1])  # SO_REUSEADDR alone would let this one bind too
    finally:
        first.close()


def test_gguf_quantization_suffixes_are_not_part_of_the_models_name():
    from types import SimpleNamespace

    from server.api.app import served_model_names
    from server.config import Settings

    base = SimpleNamespace(name="Llama-3.2-1B-Instruct-Q4_K_M-0123", model=SimpleNamespace(config=SimpleNamespace()))
    names = served_model_names(Settings(model="/models/Llama-3.2-1B-Instruct-Q4_K_M.gguf"), base)
    assert "Llama-3.2-1B-Instruct" in names and "Llama-3" not in names


def test_a_failed_start_takes_back_only_the_empty_directories_it_made(tmp_path):
    from server.process.startup import check_prompt_dir, remove_if_empty

    target = tmp_path / "a" / "b" / "prompts"
    made = check_prompt_dir(target)
    assert made == [target, target.parent, target.parent.parent] and target.is_dir()
    (target.parent / "kept.txt").write_text("a file: this directory and those above it stay")
    remove_if_empty(made)
    assert not target.exists() and (target.parent / "kept.txt").is_file()
    assert check_prompt_dir(tmp_path) == []  # it existed before: never taken back
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "task.safetensors").write_bytes(b"x")
    remove_if_empty([tmp_path / "p"])
    assert (tmp_path / "p" / "task.safetensors").is_file()


def test_a_start_that_fails_its_checks_leaves_no_empty_prompt_directory(tmp_path):
    one_line(serve("--model", str(tmp_path / "no-such-model"), "--prompt-dir", str(tmp_path / "new" / "prompts")))
    assert not (tmp_path / "new").exists()
    (tmp_path / "existing").mkdir()
    one_line(serve("--model", str(tmp_path / "no-such-model"), "--prompt-dir", str(tmp_path / "existing")))
    assert (tmp_path / "existing").is_dir()  # there before this start: kept, empty or not


def test_a_model_that_fails_to_load_leaves_no_empty_default_prompt_directory(tmp_path, llama_dir):
    import shutil

    from uvicorn.config import STARTUP_FAILURE

    from tests.serve_process import _free_port

    broken = tmp_path / "broken-model"
    shutil.copytree(llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # its config passes the checks
    cache = tmp_path / "cache"
    done = serve("--model", str(broken), "--cache-dir", str(cache), "--port", str(_free_port()))
    assert done.returncode == STARTUP_FAILURE, done.stderr
    assert not (cache / "prompts").exists(), sorted(cache.rglob("*"))  # <cache-dir>/prompts/<model> was made
