"""Isolation under churn: tasks with distinguishable greedy outputs are replaced and deleted while
requests for all of them stream. Every request gets exactly the whole output of its own task at one
of that task's versions (never another task's, never a mix of two versions), or a clean 404."""

from __future__ import annotations

import itertools
import json
import random
import threading

import torch
from safetensors.torch import save

from tests.api.conftest import iter_sse

TASKS = [f"churn-{i}" for i in range(4)]
VERSIONS = ("a", "b")
TEXT = "the quick brown fox"
NEW_TOKENS = 12
REQUESTS_PER_READER, READERS = 12, 6


def _file(seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    tensor = 4 * torch.randn(4, 64, generator=generator)  # strong enough to steer the tiny model
    return save({"prompt_embeddings": tensor}, metadata={"kind": "prompt"})


def _put(client, task: str, data: bytes) -> None:
    r = client.put(f"/prompts/{task}", content=data, headers={"content-type": "application/octet-stream"})
    assert r.status_code in (200, 201), r.text


def test_requests_keep_their_own_task_and_version_under_churn(start_server, llama_dir):
    server = start_server(model=str(llama_dir), max_running=8)
    files = {(t, v): _file(100 + 10 * i + j) for i, t in enumerate(TASKS) for j, v in enumerate(VERSIONS)}
    body = {"text": TEXT, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    try:
        with server.client() as c:
            expected: dict[str, set[tuple[int, ...]]] = {t: set() for t in TASKS}
            for (task, version), data in files.items():  # each version alone, under a name of its own
                _put(c, f"ref-{task}-{version}", data)
                r = c.post("/generate", json={**body, "task": f"ref-{task}-{version}"})
                expected[task].add(tuple(r.json()["token_ids"]))
            outputs = [o for t in TASKS for o in expected[t]]
            assert len(set(outputs)) == len(outputs) == 8, "the test needs every task and version to differ"
            for task in TASKS:
                _put(c, task, files[(task, "a")])

        stop = threading.Event()
        failures: list[str] = []
        counts = {"whole": 0, "404": 0, "writes": 0}

        def churn() -> None:
            rng = random.Random(7)
            with server.client() as client:
                for n in itertools.count():
                    if stop.is_set():
                        return
                    task = rng.choice(TASKS)
                    if n % 5 == 4:
                        client.delete(f"/prompts/{task}")
                        stop.wait(0.05)  # gone for a moment: requests for it meanwhile get a 404
                    _put(client, task, files[(task, rng.choice(VERSIONS))])
                    counts["writes"] += 1

        def read(seed: int) -> None:
            rng = random.Random(seed)
            with server.client() as client:
                for _ in range(REQUESTS_PER_READER):
                    task = rng.choice(TASKS)
                    with client.stream("POST", "/generate", json={**body, "task": task, "stream": True}) as r:
                        if r.status_code == 404:
                            error = json.loads(r.read())["error"]
                            if error["type"] != "not_found_error" or error["param"] != "task":
                                failures.append(f"unclean 404: {error}")
                            counts["404"] += 1
                            continue
                        tokens: list[int] = []
                        for name, data in iter_sse(r):
                            if name == "error":
                                failures.append(f"{task}: error event {data}")
                            tokens += json.loads(data).get("token_ids", [])
                    if tuple(tokens) not in expected[task]:
                        failures.append(f"{task}: {tokens} is none of its versions' outputs")
                    counts["whole"] += 1

        writer = threading.Thread(target=churn)
        readers = [threading.Thread(target=read, args=(seed,)) for seed in range(READERS)]
        writer.start()
        for t in readers:
            t.start()
        for t in readers:
            t.join(300)
        stop.set()
        writer.join(60)
        print(f"churn: {counts}")
        assert failures == []
        assert counts["writes"] > 0
        assert counts["whole"] + counts["404"] == READERS * REQUESTS_PER_READER
        assert counts["whole"] > 0
    finally:
        server.stop()
