"""Registry behaviour: versions, snapshots, persistence, crash safety, describe/list."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from prompt_store import BaseModelMismatch, PromptDescriptor, PromptRegistry, StorageUnavailable, UnknownTask
from prompt_store.format import TEMP_PREFIX, TEMP_SUFFIX, peft_adapter_config, read_prompt


def _sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_put_get_describe_list(tiny_geometry, make_file, tmp_path):
    registry = PromptRegistry(tiny_geometry, tmp_path)
    tensor = torch.randn(4, 64)
    snap, created = registry.put("sentiment", make_file(tensor), description="movie reviews")
    assert created and "sentiment" in registry and len(registry) == 1
    assert registry.get("sentiment") is snap
    assert snap.key == ("sentiment", snap.version)
    assert snap.sha256 == _sha(snap.embeddings)
    assert torch.equal(snap.embeddings, tensor) and snap.embeddings.data_ptr() != tensor.data_ptr()

    desc = registry.describe("sentiment")
    assert desc == PromptDescriptor(
        task="sentiment", kind="prompt", num_virtual_tokens=4, dtype="float32",
        bytes=(tmp_path / "sentiment.safetensors").stat().st_size, sha256=snap.sha256, version=snap.version,
        created_at=snap.created_at, source="file", base_model=None, description="movie reviews", error=None,
    )  # fmt: skip
    assert json.loads(json.dumps(desc.to_dict()))["num_virtual_tokens"] == 4

    registry.put("alpha", make_file(torch.randn(2, 128)))
    assert [d.task for d in registry.list()] == ["alpha", "sentiment"]


def test_versions_increase_and_old_snapshots_stay_whole(tiny_geometry, make_file, tmp_path):
    registry = PromptRegistry(tiny_geometry, tmp_path)
    first, created1 = registry.put("t", make_file(torch.ones(3, 64)))
    second, created2 = registry.put("t", make_file(torch.full((5, 64), 2.0)))
    assert (created1, created2) == (True, False)
    assert second.version > first.version and first.key != second.key
    registry.delete("t")
    # A request holding the old snapshots still sees exactly what it got.
    assert torch.equal(first.embeddings, torch.ones(3, 64)) and first.sha256 == _sha(first.embeddings)
    assert torch.equal(second.embeddings, torch.full((5, 64), 2.0))
    third, created3 = registry.put("t", make_file(torch.ones(3, 64)))
    assert created3 and third.version > second.version


def test_unknown_task(tiny_geometry, make_file):
    registry = PromptRegistry(tiny_geometry)
    for call in (registry.get, registry.delete, registry.describe):
        with pytest.raises(UnknownTask, match="unknown task 'nope'") as info:
            call("nope")
        assert info.value.param == "task"  # its HTTP status (404) is tests/api/test_errors.py's
        assert isinstance(info.value, LookupError) and isinstance(info.value, ValueError)
    assert "nope" not in registry


def test_delete_removes_the_file(tiny_geometry, make_file, tmp_path):
    registry = PromptRegistry(tiny_geometry, tmp_path)
    registry.put("t", make_file(torch.randn(2, 64)))
    assert (tmp_path / "t.safetensors").is_file()
    registry.delete("t")
    assert not (tmp_path / "t.safetensors").exists() and "t" not in registry
    with pytest.raises(UnknownTask):
        registry.get("t")


def test_restart_restores_everything(tiny_geometry, make_file, prompt_config, tmp_path):
    registry = PromptRegistry(tiny_geometry, tmp_path)
    cfg = prompt_config("prefix", n=3, base_model_name_or_path="org/base")
    a, _ = registry.put("a", make_file(torch.randn(3, 128)), config=cfg, description="d")
    b, _ = registry.put("b", make_file(torch.randn(6, 64).half()))

    again = PromptRegistry(tiny_geometry, tmp_path)
    again.load_all()
    assert again.list() == registry.list()
    for old in (a, b):
        new = again.get(old.task)
        assert (new.key, new.sha256, new.kind, new.source, new.base_model, new.description, new.created_at) == (
            old.key, old.sha256, old.kind, old.source, old.base_model, old.description, old.created_at,
        )  # fmt: skip
        assert torch.equal(new.embeddings, old.embeddings)
    assert again.put("c", make_file(torch.randn(1, 64)))[0].version > b.version


def test_file_keeps_the_uploaded_dtype(tiny_geometry, make_file, tmp_path):
    tensor = torch.randn(3, 64)
    half = PromptRegistry(tiny_geometry, tmp_path, dtype=torch.float16)
    assert half.put("t", make_file(tensor))[0].embeddings.dtype == torch.float16
    stored = read_prompt((tmp_path / "t.safetensors").read_bytes())
    assert torch.equal(stored.embeddings, tensor)  # full precision on disk
    assert stored.metadata["kind"] == "prompt" and stored.metadata["task"] == "t"
    full = PromptRegistry(tiny_geometry, tmp_path)
    full.load_all()
    assert torch.equal(full.get("t").embeddings, tensor)


def test_versions_never_repeat_across_delete_and_restart(tiny_geometry, make_file, tmp_path):
    registry = PromptRegistry(tiny_geometry, tmp_path)
    registry.put("a", make_file(torch.randn(2, 64)))
    top, _ = registry.put("b", make_file(torch.randn(2, 64)))
    registry.delete("b")  # the file holding the highest version is gone
    again = PromptRegistry(tiny_geometry, tmp_path)
    again.load_all()
    assert again.put("c", make_file(torch.randn(2, 64)))[0].version > top.version


def test_bad_files_are_listed_and_do_not_stop_the_others(tiny_geometry, make_file, tmp_path):
    good = PromptRegistry(tiny_geometry, tmp_path)
    good.put("good", make_file(torch.randn(2, 64)))
    # A prompt stored for another base model (48 wide), with a version above any issued here.
    (tmp_path / "wide.safetensors").write_bytes(make_file(torch.randn(2, 48), kind="prompt", version="9"))
    (tmp_path / "trunc.safetensors").write_bytes(make_file(torch.randn(2, 64))[:-10])
    (tmp_path / "bad name.safetensors").write_bytes(make_file(torch.randn(2, 64)))
    (tmp_path / "notes.txt").write_text("not a prompt")

    registry = PromptRegistry(tiny_geometry, tmp_path)
    registry.load_all()
    assert "good" in registry and len(registry) == 1
    listed = {d.task: d for d in registry.list()}
    assert set(listed) == {"good", "wide", "trunc", "bad name"}
    assert listed["wide"].error.startswith("WidthMismatch") and "48 wide" in listed["wide"].error
    assert listed["trunc"].error.startswith("MalformedFile")
    assert listed["bad name"].error.startswith("InvalidTaskName")
    assert listed["good"].error is None
    with pytest.raises(UnknownTask, match=r"failed to load.*WidthMismatch"):
        registry.get("wide")
    assert registry.describe("wide").bytes == (tmp_path / "wide.safetensors").stat().st_size
    # A failed file's version was issued once, so it is not issued again.
    assert registry.put("new", make_file(torch.randn(2, 64)))[0].version > 9
    # A failed file can be replaced, or deleted from disk.
    assert registry.put("wide", make_file(torch.randn(2, 64)))[1] is True
    registry.delete("trunc")
    assert not (tmp_path / "trunc.safetensors").exists()


def test_hand_placed_peft_weights_get_a_fresh_version(tiny_geometry, make_file, tmp_path):
    (tmp_path / "manual.safetensors").write_bytes(make_file(torch.randn(3, 128), format="pt"))
    registry = PromptRegistry(tiny_geometry, tmp_path)
    registry.load_all()
    snap = registry.get("manual")
    assert snap.kind == "prefix" and snap.version >= 1 and snap.source == "file"
    assert registry.put("next", make_file(torch.randn(1, 64)))[0].version > snap.version


def test_crash_before_rename_keeps_the_old_version(tiny_geometry, make_file, tmp_path, monkeypatch):
    registry = PromptRegistry(tiny_geometry, tmp_path)
    old, _ = registry.put("t", make_file(torch.ones(2, 64)))

    def crash(src, dst):
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageUnavailable, match="simulated crash"):
        registry.put("t", make_file(torch.zeros(7, 64)))
    monkeypatch.undo()

    assert registry.get("t") is old  # memory still serves the old version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]  # no temp litter
    again = PromptRegistry(tiny_geometry, tmp_path)
    again.load_all()
    assert again.get("t").sha256 == old.sha256 and again.get("t").num_virtual_tokens == 2
    # The version number spent on the failed write is not reused.
    assert registry.put("t", make_file(torch.zeros(7, 64)))[0].version > old.version + 1


def test_litter_of_a_hard_crash_is_never_a_prompt(tiny_geometry, make_file, tmp_path):
    # A process killed after writing the temp file but before the rename leaves a full, valid
    # prompt under the temp name: it must not appear as a task.
    registry = PromptRegistry(tiny_geometry, tmp_path)
    old, _ = registry.put("t", make_file(torch.ones(2, 64)))
    litter = tmp_path / f"{TEMP_PREFIX}t.safetensors-abc{TEMP_SUFFIX}"
    litter.write_bytes(make_file(torch.zeros(7, 64)))
    (tmp_path / f"{TEMP_PREFIX}x{TEMP_SUFFIX}").write_bytes(b"half a fi")

    again = PromptRegistry(tiny_geometry, tmp_path)
    again.load_all()
    assert [d.task for d in again.list()] == ["t"] and again.get("t").sha256 == old.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]


def test_in_memory_registry(tiny_geometry, make_file):
    registry = PromptRegistry(tiny_geometry)
    registry.load_all()  # no directory: nothing to load
    snap, _ = registry.put("t", make_file(torch.randn(2, 64)))
    assert registry.describe("t").bytes > snap.embeddings.nbytes  # the size the file would have
    registry.delete("t")
    assert len(registry) == 0


def test_registry_refuses_an_unservable_dtype(tiny_geometry):
    with pytest.raises(ValueError, match="dtype must be one of"):
        PromptRegistry(tiny_geometry, dtype=torch.float64)


def test_a_symlink_out_of_the_prompt_directory_is_never_served(tiny_geometry, make_file, tmp_path):
    """Issue 10, item 8: a link to a file outside the directory was served as a task."""
    prompts, outside = tmp_path / "prompts", tmp_path / "outside"
    outside.mkdir()
    (outside / "elsewhere.safetensors").write_bytes(make_file(torch.randn(2, 64)))
    registry = PromptRegistry(tiny_geometry, prompts)
    registry.put("inside", make_file(torch.randn(2, 64)))
    (prompts / "escape.safetensors").symlink_to(outside / "elsewhere.safetensors")
    (prompts / "alias.safetensors").symlink_to(prompts / "inside.safetensors")  # stays inside: fine
    registry.load_all()
    assert "escape" not in registry and {"inside", "alias"} <= {d.task for d in registry.list() if d.error is None}
    error = registry.describe("escape").error
    assert error.startswith("OutsidePromptDirectory") and "outside the prompt directory" in error
    with pytest.raises(UnknownTask, match="OutsidePromptDirectory"):
        registry.get("escape")
    registry.delete("escape")  # removes the link, never what it points to
    assert not (prompts / "escape.safetensors").is_symlink() and (outside / "elsewhere.safetensors").exists()


def test_an_adapter_for_another_base_model_is_flagged_at_start_too(tiny_geometry, make_file, tmp_path):
    # Uploads of it over HTTP: tests/api/test_base_model.py.
    geometry, data = tiny_geometry, make_file(torch.randn(2, 64))
    config = peft_adapter_config("prompt", 2, geometry, base_model="meta-llama/Meta-Llama-3-8B")
    relaxed = PromptRegistry(geometry, tmp_path, base_model_names=["tiny"])
    relaxed.put("t", data, config=config)
    assert relaxed.get("t").warnings and relaxed.describe("t").base_model == "meta-llama/Meta-Llama-3-8B"
    again = PromptRegistry(geometry, tmp_path, base_model_names=["tiny"])
    again.load_all()
    assert again.get("t").warnings == relaxed.get("t").warnings
    strict = PromptRegistry(geometry, tmp_path, base_model_names=["tiny"], strict_base_model=True)
    strict.load_all()
    assert "t" not in strict and strict.describe("t").error.startswith("BaseModelMismatch")
    with pytest.raises(BaseModelMismatch):
        strict.put("u", data, config=config)
