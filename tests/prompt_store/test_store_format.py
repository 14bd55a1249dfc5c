"""The file format on its own: round trips, header parsing, atomic writes."""

from __future__ import annotations

import os

import pytest
import torch

from prompt_store import read_prompt, write_prompt
from prompt_store.format import atomic_write, parse_header, peek_metadata, tensor_sha256


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_keeps_dtype_values_and_metadata(dtype):
    tensor = torch.randn(5, 64).to(dtype)
    data = write_prompt(tensor, {"kind": "prompt", "description": "héllo ✓", "base_model": None})
    prompt = read_prompt(data)
    assert prompt.embeddings.dtype == dtype and torch.equal(prompt.embeddings, tensor)
    assert prompt.metadata["kind"] == "prompt" and prompt.metadata["description"] == "héllo ✓"
    assert prompt.metadata["format"] == "pt"  # what PEFT and transformers expect
    assert "base_model" not in prompt.metadata  # None values are left out, not written as "None"
    header, metadata = parse_header(data)
    assert header["prompt_embeddings"]["shape"] == [5, 64] and metadata == prompt.metadata


def test_tensor_sha256_depends_on_values_and_dtype():
    tensor = torch.randn(3, 8)
    assert tensor_sha256(tensor) == tensor_sha256(tensor.clone())
    assert tensor_sha256(tensor) != tensor_sha256(tensor.half())
    assert tensor_sha256(tensor.bfloat16()) == tensor_sha256(tensor.bfloat16())  # no numpy bfloat16 needed
    assert tensor_sha256(tensor.t()) == tensor_sha256(tensor.t().contiguous())


def test_peek_metadata_reads_only_the_header(tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(write_prompt(torch.randn(2, 4), {"version": "7"})[:-4])  # truncated body
    assert peek_metadata(path)["version"] == "7"
    path.write_bytes(b"garbage")
    assert peek_metadata(path) == {}
    assert peek_metadata(tmp_path / "missing") == {}


def test_atomic_write_replaces_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two" and os.listdir(tmp_path) == ["f.bin"]

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"three")
    assert target.read_bytes() == b"two" and os.listdir(tmp_path) == ["f.bin"]
