"""Conditional writes over real HTTP: the version as a strong ETag, If-Match / If-None-Match, 412."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save

from tests.api.conftest import upload_raw

HIDDEN = 64  # the tiny llama's hidden size (tests/conftest.py)


@pytest.fixture(scope="module")
def client(llama_server):
    with llama_server.client() as c:
        yield c


def weights(seed: int) -> bytes:
    torch.manual_seed(seed)
    return save({"prompt_embeddings": torch.randn(4, HIDDEN)}, metadata={"kind": "prompt"})


def put(client, task: str, seed: int = 0, **headers):
    return upload_raw(client, task, weights(seed), headers=headers)


def test_every_prompt_response_carries_the_version_as_a_strong_etag(client):
    created = put(client, "etag-a")
    assert created.status_code == 201, created.text
    version = created.json()["version"]
    assert created.headers["etag"] == f'"{version}"'
    described = client.get("/prompts/etag-a")
    assert described.headers["etag"] == f'"{version}"'
    replaced = put(client, "etag-a", seed=1)
    assert replaced.status_code == 200 and replaced.headers["etag"] == f'"{replaced.json()["version"]}"'
    assert replaced.json()["version"] > version
    # a poller's conditional GET: 304 while nothing changed
    assert client.get("/prompts/etag-a", headers={"If-None-Match": replaced.headers["etag"]}).status_code == 304
    assert client.get("/prompts/etag-a", headers={"If-None-Match": f'"{version}"'}).status_code == 200


def test_a_stale_if_match_is_412_with_the_current_version_and_writes_nothing(client):
    first = put(client, "etag-b").json()["version"]
    second = put(client, "etag-b", seed=1, **{"If-Match": f'"{first}"'})
    assert second.status_code == 200, second.text
    current = second.json()["version"]
    stale = put(client, "etag-b", seed=2, **{"If-Match": f'"{first}"'})
    assert stale.status_code == 412, stale.text
    error = stale.json()["error"]
    assert error["type"] == "precondition_error" and error["param"] == "If-Match"
    assert error["current_version"] == current and f'"{current}"' in error["message"]
    assert client.get("/prompts/etag-b").json()["version"] == current  # untouched
    weak = put(client, "etag-b", seed=2, **{"If-Match": f'W/"{current}"'})  # If-Match compares strongly
    assert weak.status_code == 412
    # Tags compare exactly ("07" is not "7"), and a Latin-1 digit is no version (nor a 500).
    for near_miss in (f'"0{current}"'.encode(), '"²"'.encode("latin-1")):
        assert put(client, "etag-b", seed=2, **{"If-Match": near_miss}).status_code == 412
    listed = put(client, "etag-b", seed=2, **{"If-Match": f'"999999", , "{current}",'})  # empty members ignored
    assert listed.status_code == 200
    # a list header may come as several lines: every line counts
    current = listed.json()["version"]
    two_lines = client.put("/prompts/etag-b", content=weights(3),
                           headers=[("content-type", "application/octet-stream"), ("If-Match", '"1"'),
                                    ("If-Match", f'"{current}"')])
    assert two_lines.status_code == 200, two_lines.text


def test_if_none_match_star_creates_only(client):
    assert put(client, "etag-c", **{"If-None-Match": "*"}).status_code == 201
    again = put(client, "etag-c", seed=1, **{"If-None-Match": "*"})
    assert again.status_code == 412 and again.json()["error"]["param"] == "If-None-Match"
    assert put(client, "etag-missing", **{"If-Match": "*"}).status_code == 412  # If-Match * needs it to exist
    assert client.get("/prompts/etag-missing").status_code == 404


def test_delete_honours_if_match_and_versions_never_come_back(client):
    version = put(client, "etag-d").json()["version"]
    assert client.delete("/prompts/etag-d", headers={"If-Match": f'"{version + 1000}"'}).status_code == 412
    assert client.delete("/prompts/etag-d", headers={"If-Match": f'"{version}"'}).status_code == 204
    gone = client.delete("/prompts/etag-d", headers={"If-Match": f'"{version}"'})
    assert gone.status_code == 404  # not 412: conditions count only where the answer would be 2xx (RFC 9110)
    recreated = put(client, "etag-d").json()["version"]
    assert recreated > version  # so an old If-Match can never match the new prompt
    assert put(client, "etag-d", **{"If-Match": f'"{version}"'}).status_code == 412


@pytest.mark.parametrize("value", ["7", ",", "", 'W/7', '"1""2"', '"1" x'])
def test_a_malformed_condition_is_a_422_naming_the_header(client, value):
    put(client, "etag-e")
    r = put(client, "etag-e", **{"If-Match": value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "If-Match" and "quoted ETags" in r.json()["error"]["message"]


def test_racing_writers_with_the_same_if_match_exactly_one_wins(client, llama_server):
    base = put(client, "etag-race").json()["version"]
    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def write(seed: int) -> None:
        with llama_server.client() as own:
            barrier.wait()
            statuses.append(put(own, "etag-race", seed=seed, **{"If-Match": f'"{base}"'}).status_code)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] + [412] * 5
