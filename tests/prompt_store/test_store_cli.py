"""`promptswap prompts inspect|convert` through the real entry point, server.process.cli.main."""

from __future__ import annotations

import json

import pytest
import torch

from prompt_store import PromptRegistry, read_prompt
from server.process.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_peft_dir_with_model(capsys, llama_dir, make_adapter):
    adapter, expected = make_adapter(llama_dir, "prefix_projection")
    code, out, _ = run(capsys, "prompts", "inspect", str(adapter), "--model", str(llama_dir))
    assert code == 0
    assert "kind: prefix" in out and f"num_virtual_tokens: {expected.shape[0]}" in out
    assert f"shape: {list(expected.shape)}" in out and "dtype: float32" in out
    assert "peft_type: PREFIX_TUNING" in out and "problems: none" in out


def test_inspect_json(capsys, llama_dir, make_adapter):
    adapter, expected = make_adapter(llama_dir, "p_tuning")
    code, out, _ = run(capsys, "prompts", "inspect", str(adapter), "--model", str(llama_dir), "--json")
    report = json.loads(out)
    assert code == 0 and report["valid"] is True and report["problems"] == []
    assert (report["kind"], report["num_virtual_tokens"], report["source"]) == ("prompt", expected.shape[0], "peft")
    assert report["model"]["hidden_size"] == 64


def test_inspect_against_the_wrong_model_fails(capsys, llama_dir, gpt2_dir, make_adapter):
    adapter, _ = make_adapter(llama_dir, "prefix")
    code, out, _ = run(capsys, "prompts", "inspect", str(adapter), "--model", str(gpt2_dir))
    assert code == 1
    assert "valid: False" in out and "WidthMismatch" in out and "256 wide" in out and "128 wide" in out


def test_inspect_bare_file_without_model(capsys, tmp_path, make_file):
    path = tmp_path / "p.safetensors"
    path.write_bytes(make_file(torch.randn(3, 64)))
    code, out, _ = run(capsys, "prompts", "inspect", str(path))
    assert code == 0 and "kind undetermined" in out and "num_virtual_tokens: 3" in out
    code, out, _ = run(capsys, "prompts", "inspect", str(path), "--kind", "prompt")
    assert code == 0 and "kind: prompt" in out and "undetermined" not in out


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x05\x00\x00\x00\x00\x00\x00\x00{}", "MalformedFile"),
        (None, "NonFiniteValues"),
    ],
)
def test_inspect_invalid_file(capsys, tmp_path, make_file, content, problem):
    path = tmp_path / "bad.safetensors"
    if content is None:
        content = make_file(torch.tensor([[1.0, float("nan")]]))
    path.write_bytes(content)
    code, out, _ = run(capsys, "prompts", "inspect", str(path))
    assert code == 1 and problem in out and "valid: False" in out


def test_inspect_overflow_for_the_served_dtype(capsys, tmp_path, make_file):
    path = tmp_path / "big.safetensors"
    path.write_bytes(make_file(torch.full((2, 64), 1e6), kind="prompt"))
    assert run(capsys, "prompts", "inspect", str(path))[0] == 0
    code, out, _ = run(capsys, "prompts", "inspect", str(path), "--dtype", "float16")
    assert code == 1 and "overflows float16" in out


def test_inspect_usage_errors(capsys, tmp_path):
    code, _, err = run(capsys, "prompts", "inspect", str(tmp_path), "--model", str(tmp_path / "no-model"))
    assert code == 2 and "cannot read the model config" in err
    code, out, _ = run(capsys, "prompts", "inspect", str(tmp_path / "missing.safetensors"))
    assert code == 1 and "neither a file nor" in out
    with pytest.raises(SystemExit) as info:
        main(["prompts"])
    assert info.value.code == 2


def test_convert_then_load(capsys, tmp_path, gpt2_dir, geometries, make_adapter):
    adapter, expected = make_adapter(gpt2_dir, "prefix")
    out_file = tmp_path / "out" / "task.safetensors"
    code, out, _ = run(capsys, "prompts", "convert", str(adapter), str(out_file), "--model", str(gpt2_dir),
                       "--description", "converted")  # fmt: skip
    assert code == 0 and f"wrote {out_file}" in out and "prefix" in out
    stored = read_prompt(out_file.read_bytes())
    assert torch.equal(stored.embeddings, expected)
    assert stored.metadata["kind"] == "prefix" and stored.metadata["source"] == "peft"
    assert stored.metadata["peft_type"] == "PREFIX_TUNING" and stored.metadata["description"] == "converted"
    assert stored.metadata["base_model"] == str(gpt2_dir)

    snap, _ = PromptRegistry(geometries["gpt2"]).put("task", out_file.read_bytes())
    assert snap.kind == "prefix" and snap.source == "peft" and snap.description == "converted"
    assert torch.equal(snap.embeddings, expected)

    code, _, err = run(capsys, "prompts", "convert", str(adapter), str(out_file))
    assert code == 2 and "--force" in err
    assert run(capsys, "prompts", "convert", str(adapter), str(out_file), "--force")[0] == 0


def test_convert_refuses_invalid_and_non_directories(capsys, tmp_path, llama_dir, gpt2_dir, make_adapter):
    adapter, _ = make_adapter(llama_dir, "prompt_tuning")
    code, _, err = run(capsys, "prompts", "convert", str(adapter), str(tmp_path / "x.safetensors"),
                       "--max-virtual-tokens", "2")  # fmt: skip
    assert code == 1 and "VirtualTokenCountOutOfRange" in err and not (tmp_path / "x.safetensors").exists()
    code, _, err = run(capsys, "prompts", "convert", str(adapter / "adapter_model.safetensors"), str(tmp_path / "y"))
    assert code == 2 and "not a directory" in err
