"""`promptswap model path`: the directory serve and train load, alone on stdout, which transformers loads; a hub
id as it is (noted on stderr); a missing path or a bad option is one line on stderr and exit status 2."""

from __future__ import annotations

import pytest

from server.demo.random_demo import ensure_demo_model
from server.process.cli import main


@pytest.fixture(autouse=True)
def no_model_from_the_environment(monkeypatch):
    for name in ("PROMPTSWAP_MODEL", "PROMPTSWAP_GGUF_FILE", "PROMPTSWAP_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.slow  # builds and loads the random demo
def test_it_prints_the_random_demos_directory_which_transformers_loads(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["model", "path", "--model", "random-demo", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out == f"{ensure_demo_model(tmp_path)}\n"  # the directory alone: $(promptswap model path) works
    model = AutoModelForCausalLM.from_pretrained(out.strip())
    assert model.config.model_type == "llama" and AutoTokenizer.from_pretrained(out.strip()) is not None
    assert main(["model", "path", "--model", "random-demo", "--cache-dir", str(tmp_path)]) == 0  # built once
    assert capsys.readouterr().out == out


def test_a_local_directory_is_printed_as_given(llama_dir, capsys):
    assert main(["model", "path", "--model", str(llama_dir)]) == 0
    assert capsys.readouterr().out == f"{llama_dir}\n"


def test_a_hub_id_is_printed_as_it_is_and_said_to_be_one(capsys):
    assert main(["model", "path", "--model", "HuggingFaceTB/SmolLM2-135M"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "HuggingFaceTB/SmolLM2-135M\n" and "hub id" in captured.err


@pytest.mark.parametrize(("argv", "said"), [
    (["--model", "./no/such/model"], "the model directory ./no/such/model does not exist"),
    (["--model", "missing.gguf"], "the GGUF file missing.gguf does not exist"),
    (["--gguf-file", "m.gguf"], "--gguf-file / PROMPTSWAP_GGUF_FILE names a file inside the --model directory"),
])
def test_what_cannot_be_found_is_one_line_and_exit_status_2(tmp_path, monkeypatch, capsys, argv, said):
    monkeypatch.chdir(tmp_path)
    assert main(["model", "path", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("promptswap model path: ") and said in captured.err
    assert captured.err.count("\n") == 1


def test_a_directory_without_a_model_is_refused(tmp_path, capsys):
    assert main(["model", "path", "--model", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
