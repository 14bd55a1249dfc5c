"""A prompt directory that is full, read-only or immutable: a StorageError naming the task and the cause,
one log line, nothing half-written, the tasks already served still served, and versions never reissued."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from prompt_store import PromptRegistry, StorageFull, StorageUnavailable
from prompt_store.backends.local import VERSION_MARKER
from tests.filesystems import fill, immutable, remount_readonly, small_tmpfs


def _storage_logs(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "prompt_store.registry" and r.levelno >= logging.ERROR]


def _tasks_on_disk(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".safetensors")


@pytest.fixture
def full_dir(tmp_path):
    with small_tmpfs(tmp_path / "mnt", size_kib=256) as mnt:
        yield mnt


def test_put_on_a_full_disk_is_storage_full_and_changes_nothing(tiny_geometry, make_file, full_dir, caplog):
    registry = PromptRegistry(tiny_geometry, full_dir)
    old, _ = registry.put("kept", make_file(torch.ones(2, 64)))
    fill(full_dir)
    caplog.set_level(logging.INFO)

    with pytest.raises(StorageFull) as refused:
        registry.put("kept", make_file(torch.zeros(8, 64)))
    message = str(refused.value)
    assert "'kept'" in message and "is full" in message and "No space left on device" in message
    assert refused.value.param == "task"
    records = _storage_logs(caplog)
    assert len(records) == 1 and records[0].exc_info is None  # one line, no traceback

    with pytest.raises(StorageFull):
        registry.put("new", make_file(torch.zeros(8, 64)))
    assert registry.get("kept") is old and "new" not in registry  # memory serves what it served
    assert _tasks_on_disk(full_dir) == ["kept.safetensors"]
    assert not [p for p in full_dir.iterdir() if p.name.startswith(".promptswap-tmp-")]  # no half-written file
    again = PromptRegistry(tiny_geometry, full_dir)
    again.load_all()
    assert again.get("kept").sha256 == old.sha256


def test_delete_frees_a_full_disk_and_versions_never_repeat(tiny_geometry, make_file, full_dir):
    registry = PromptRegistry(tiny_geometry, full_dir)
    registry.put("a", make_file(torch.randn(2, 64)))
    top, _ = registry.put("big", make_file(torch.randn(256, 64)))  # 64 KiB: the highest version
    fill(full_dir)
    with pytest.raises(StorageFull):
        registry.put("c", make_file(torch.randn(2, 64)))

    registry.delete("big")  # must work with no free block, and free the space
    assert "big" not in registry and _tasks_on_disk(full_dir) == ["a.safetensors"]
    snap, created = registry.put("c", make_file(torch.randn(2, 64)))
    assert created and snap.version > top.version + 1  # the failed put's number is not reused either

    registry.delete("c")
    restarted = PromptRegistry(tiny_geometry, full_dir)
    restarted.load_all()
    assert [d.task for d in restarted.list()] == ["a"]
    (full_dir / "filler").unlink()
    assert restarted.put("d", make_file(torch.randn(2, 64)))[0].version > snap.version
    markers = [p for p in full_dir.iterdir() if p.name.startswith(VERSION_MARKER)]
    assert len(markers) == 1 and markers[0].stat().st_size == 0  # one empty marker, the highest


def test_read_only_directory_is_unavailable_and_keeps_serving(tiny_geometry, make_file, tmp_path, caplog):
    with small_tmpfs(tmp_path / "mnt", size_kib=256) as mnt:
        registry = PromptRegistry(tiny_geometry, mnt)
        old, _ = registry.put("t", make_file(torch.ones(2, 64)))
        remount_readonly(mnt)
        caplog.set_level(logging.INFO)
        with pytest.raises(StorageUnavailable, match=r"could not store task 't'.*read-only"):
            registry.put("t", make_file(torch.zeros(3, 64)))
        with pytest.raises(StorageUnavailable, match=r"could not delete task 't'.*read-only"):
            registry.delete("t")
        assert registry.get("t") is old and len(_storage_logs(caplog)) == 2
        restarted = PromptRegistry(tiny_geometry, mnt)  # a read-only directory still loads
        restarted.load_all()
        assert restarted.get("t").sha256 == old.sha256


def test_immutable_directory_is_unavailable(tiny_geometry, make_file, tmp_path):
    directory = tmp_path / "prompts"
    registry = PromptRegistry(tiny_geometry, directory)
    old, _ = registry.put("t", make_file(torch.ones(2, 64)))
    with immutable(directory):
        with pytest.raises(StorageUnavailable, match=r"not writable \(operation not permitted"):
            registry.put("t", make_file(torch.zeros(3, 64)))
        with pytest.raises(StorageUnavailable):
            registry.delete("t")
        assert registry.get("t") is old
    assert registry.put("t", make_file(torch.zeros(3, 64)))[0].version > old.version


def test_deleting_a_symlink_never_truncates_its_target(tiny_geometry, make_file, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(make_file(torch.ones(2, 64)))
    directory = tmp_path / "prompts"
    directory.mkdir()
    (directory / "linked.safetensors").symlink_to(outside)
    registry = PromptRegistry(tiny_geometry, directory)
    registry.load_all()
    registry.delete("linked")
    assert outside.stat().st_size > 0 and not (directory / "linked.safetensors").exists()


def test_deleting_a_hard_linked_file_never_empties_its_other_names(tiny_geometry, make_file, tmp_path):
    outside = tmp_path / "my-adapter.safetensors"
    outside.write_bytes(make_file(torch.ones(2, 64)))
    directory = tmp_path / "prompts"
    directory.mkdir()
    os.link(outside, directory / "linked.safetensors")  # a user's file, linked in
    registry = PromptRegistry(tiny_geometry, directory)
    registry.put("a", make_file(torch.randn(2, 64)))
    os.link(directory / "a.safetensors", directory / "b.safetensors")  # a sibling sharing a's bytes
    registry.load_all()
    size = outside.stat().st_size
    registry.delete("linked")
    registry.delete("a")
    assert outside.stat().st_size == size
    again = PromptRegistry(tiny_geometry, directory)
    again.load_all()
    assert [(d.task, d.error) for d in again.list()] == [("b", None)]


def test_a_listed_file_with_a_malformed_name_can_be_described_and_deleted(tiny_geometry, make_file, tmp_path):
    (tmp_path / "my task.safetensors").write_bytes(make_file(torch.ones(2, 64)))
    registry = PromptRegistry(tiny_geometry, tmp_path)
    registry.load_all()
    assert registry.describe("my task").error.startswith("InvalidTaskName")
    registry.delete("my task")
    assert registry.list() == [] and not (tmp_path / "my task.safetensors").exists()
