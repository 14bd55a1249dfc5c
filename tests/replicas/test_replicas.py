"""Replicas sharing one prompt store, as they would run: a real S3 server (moto's server mode, its own
process) behind a TCP proxy that can cut it off, and two `promptswap serve` processes (`--threads 1`
each) on their own ports sharing one bucket. Bounds are generous; benchmarks/convergence.py measures."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
import pytest
import torch
from safetensors.torch import save

from tests.object_store import CREDENTIALS, TcpProxy, moto_process, new_bucket
from tests.serve_process import start_serve_process

pytest.importorskip("boto3")
pytest.importorskip("moto")

POLL_S = 0.5
BOUND_S = 20.0  # convergence within this, on a loaded 2-core machine (measured: well under a second)


@dataclass
class Cluster:
    a: str
    b: str
    proxy: TcpProxy
    bucket: str
    b_ready_before_listing: int = 0
    b_health_before_listing: int = 0
    logs: list = field(default_factory=list)


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except Exception:
        proc.kill()


@pytest.fixture(scope="module")
def cluster(llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    with moto_process() as endpoint:
        proxy = TcpProxy(int(endpoint.rsplit(":", 1)[1]))
        bucket = new_bucket(endpoint)
        flags = ("--threads", "1", "--prompt-store", f"s3://{bucket}/tasks", "--s3-endpoint-url", proxy.endpoint,
                 "--prompt-poll-interval-s", str(POLL_S), "--s3-timeout-s", "2", "--max-running", "8")
        procs = []
        try:
            proc_a, a = start_serve_process(llama_dir, tmp, *flags, env=CREDENTIALS, log_path=tmp / "a.log")
            procs.append(proc_a)
            _until(lambda: httpx.get(f"{a}/ready").status_code == 200, "A ready")
            # B starts while the store is cut off: alive (/health) but not ready until its first listing.
            proxy.cut()
            proc_b, b = start_serve_process(llama_dir, tmp, *flags, env=CREDENTIALS, log_path=tmp / "b.log")
            procs.append(proc_b)
            cluster = Cluster(a, b, proxy, bucket)
            cluster.b_health_before_listing = httpx.get(f"{b}/health").status_code
            cluster.b_ready_before_listing = httpx.get(f"{b}/ready").status_code
            proxy.restore()
            _until(lambda: httpx.get(f"{b}/ready").status_code == 200, "B ready")
            yield cluster
        finally:
            for proc in procs:
                _stop(proc)
            proxy.close()


def _until(check, what: str, bound: float = BOUND_S) -> float:
    start = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        assert time.monotonic() - start < bound, f"{what}: not within {bound} s"
        time.sleep(0.05)


def _weights(seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return save({"prompt_embeddings": torch.randn(4, 64, generator=gen)}, metadata={"kind": "prompt"})


def _put(url: str, task: str, seed: int, **headers: str) -> httpx.Response:
    return httpx.put(f"{url}/prompts/{task}", content=_weights(seed), timeout=30,
                     headers={"content-type": "application/octet-stream", **headers})


def _generate(url: str, task: str) -> list[int]:
    answer = httpx.post(f"{url}/generate", json={"task": task, "text": "hello world", "max_new_tokens": 6},
                        timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["token_ids"]


def test_a_replica_is_ready_only_after_its_first_listing(cluster):
    assert cluster.b_health_before_listing == 200  # alive: the model is loaded
    assert cluster.b_ready_before_listing == 503  # not ready: the store has not been listed


def test_an_upload_on_one_replica_is_served_by_the_other(cluster):
    created = _put(cluster.a, "shared", 1)
    assert created.status_code == 201 and created.headers["etag"] == '"1"'
    assert httpx.get(f"{cluster.a}/prompts/shared").status_code == 200  # the writer sees it at once
    _until(lambda: httpx.get(f"{cluster.b}/prompts/shared").headers.get("etag") == '"1"', "B loads the upload")
    assert _generate(cluster.b, "shared") == _generate(cluster.a, "shared")
    # A replace is followed too, and both replicas then answer with the new weights.
    assert _put(cluster.a, "shared", 2).headers["etag"] == '"2"'
    _until(lambda: httpx.get(f"{cluster.b}/prompts/shared").headers.get("etag") == '"2"', "B loads the replace")
    assert _generate(cluster.b, "shared") == _generate(cluster.a, "shared")


def test_a_stale_if_match_on_another_replica_is_refused(cluster):
    assert _put(cluster.a, "guarded", 3).status_code == 201
    _until(lambda: httpx.get(f"{cluster.b}/prompts/guarded").status_code == 200, "B loads it")
    assert _put(cluster.a, "guarded", 4, **{"if-match": '"1"'}).headers["etag"] == '"2"'
    # B may not have seen version 2 yet; the store decides, so B's stale condition fails either way.
    stale = _put(cluster.b, "guarded", 5, **{"if-match": '"1"'})
    assert stale.status_code == 412, stale.text
    assert stale.json()["error"]["current_version"] == 2
    assert _put(cluster.b, "guarded", 5, **{"if-none-match": "*"}).status_code == 412
    assert httpx.get(f"{cluster.a}/prompts/guarded").headers["etag"] == '"2"'


def test_a_delete_on_one_replica_reaches_the_other(cluster):
    assert _put(cluster.a, "doomed", 6).status_code == 201
    _until(lambda: httpx.get(f"{cluster.b}/prompts/doomed").status_code == 200, "B loads it")
    assert httpx.delete(f"{cluster.a}/prompts/doomed", timeout=30).status_code == 204
    _until(lambda: httpx.get(f"{cluster.b}/prompts/doomed").status_code == 404, "B drops it")
    # Re-created on B: a version above every one the task had, so A's old tags cannot match it.
    again = _put(cluster.b, "doomed", 7)
    assert again.status_code == 201 and again.headers["etag"] == '"2"'


def test_an_unreachable_store_keeps_cached_tasks_serving(cluster):
    assert _put(cluster.a, "cached", 8).status_code == 201
    _until(lambda: httpx.get(f"{cluster.b}/prompts/cached").status_code == 200, "B loads it")
    expected = _generate(cluster.a, "cached")
    cluster.proxy.cut()
    try:
        assert _generate(cluster.b, "cached") == expected
        refused = _put(cluster.b, "during-outage", 9)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "storage_error"
        assert "object store" in refused.json()["error"]["message"]
        assert httpx.get(f"{cluster.b}/ready").status_code == 200  # still serving what it has
        _until(lambda: _gauge(cluster.b, "promptswap_prompt_store_failures") >= 1, "B's polls fail")
        assert _generate(cluster.b, "cached") == expected
    finally:
        cluster.proxy.restore()
    assert _put(cluster.a, "after-outage", 10).status_code == 201
    _until(lambda: httpx.get(f"{cluster.b}/prompts/after-outage").status_code == 200, "B recovers")
    assert httpx.get(f"{cluster.b}/prompts/during-outage").status_code == 404
    assert _gauge(cluster.b, "promptswap_prompt_store_failures") == 0


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not on /metrics")
