"""Many threads put/get/delete one task: every snapshot read is whole, and disk agrees with memory."""

from __future__ import annotations

import hashlib
import random
import threading

import pytest
import torch

from prompt_store import PromptRegistry, UnknownTask


def _sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.slow
def test_threads_hammer_one_task(tiny_geometry, make_file, tmp_path):
    registry = PromptRegistry(tiny_geometry, tmp_path)
    bystander, _ = registry.put("bystander", make_file(torch.full((2, 64), -1.0)))
    # Each upload is one marker value repeated, so a torn read (rows of two versions) is visible.
    uploads = {v: make_file(torch.full((1 + v % 16, 64), float(v))) for v in range(1, 400)}
    errors: list[str] = []
    seen_versions: list[int] = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        for _ in range(60):
            op = rng.random()
            try:
                if op < 0.35:
                    marker = rng.randrange(1, 400)
                    snap, _ = registry.put("t", uploads[marker])
                    if snap.embeddings[0, 0].item() != marker:
                        errors.append(f"put returned another upload: {snap.key}")
                elif op < 0.5:
                    registry.delete("t")
                else:
                    snap = registry.get("t")
                    seen_versions.append(snap.version)
                    emb = snap.embeddings
                    marker = emb[0, 0].item()
                    if (
                        _sha(emb) != snap.sha256
                        or emb.shape != (snap.num_virtual_tokens, 64)
                        or snap.num_virtual_tokens != 1 + int(marker) % 16
                        or not torch.all(emb == marker)
                    ):
                        errors.append(f"torn snapshot {snap.key}")
                    registry.describe("t")
                    registry.list()
            except UnknownTask:
                pass  # deleted by another thread meanwhile: expected
            except Exception as exc:  # anything else is a bug; record it for the main thread
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert seen_versions, "no reader ever saw the task"

    # Memory and disk agree: a fresh registry over the same directory sees the same state.
    again = PromptRegistry(tiny_geometry, tmp_path)
    again.load_all()
    assert ("t" in again) == ("t" in registry)
    if "t" in registry:
        assert again.get("t").key == registry.get("t").key and again.get("t").sha256 == registry.get("t").sha256
    assert again.get("bystander").sha256 == bystander.sha256 == registry.get("bystander").sha256
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == sorted(
        f"{d.task}.safetensors" for d in registry.list()
    )
