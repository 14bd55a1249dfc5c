"""The object-store backend against a real S3 server (moto's server mode, in this process): two registries
on one bucket behave as two replicas would."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch

from prompt_store import PreconditionFailed, Preconditions, PromptRegistry, StorageUnavailable, UnknownTask
from prompt_store.backends.s3 import CHANGES, TOMBSTONES, ObjectStore, parse_url
from tests.object_store import TcpProxy, moto_in_process, new_bucket, s3_client

pytestmark = pytest.mark.slow  # a real S3 server (moto), and processes

pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def endpoint():
    with moto_in_process() as url:
        yield url


@pytest.fixture
def bucket(endpoint):
    return new_bucket(endpoint)


def _store(endpoint: str, bucket: str, prefix: str = "tasks") -> ObjectStore:
    return ObjectStore(f"s3://{bucket}/{prefix}", client=s3_client(endpoint))


def _replicas(tiny_geometry, endpoint, bucket, n=2):
    return [PromptRegistry(tiny_geometry, backend=_store(endpoint, bucket)) for _ in range(n)]


def _weights(make_file, value: float, rows: int = 2) -> bytes:
    return make_file(torch.full((rows, 64), value))


def test_url_names_bucket_and_prefix():
    assert parse_url("s3://b/some/prefix/") == ("b", "some/prefix")
    assert parse_url("s3://b") == ("b", "")
    with pytest.raises(ValueError, match="names no bucket"):
        parse_url("s3:///prefix")


def test_a_write_on_one_replica_reaches_the_other(tiny_geometry, make_file, endpoint, bucket):
    a, b = _replicas(tiny_geometry, endpoint, bucket)
    b.sync()
    assert b.synced and len(b) == 0
    snap, created = a.put("sentiment", _weights(make_file, 1.0))
    assert created and snap.version == 1
    assert a.get("sentiment") is snap  # the writer sees its own write at once
    assert b.backend.changed() and b.sync() == 1
    assert b.get("sentiment").version == 1
    assert torch.equal(b.get("sentiment").embeddings, snap.embeddings)
    assert not b.backend.changed() and b.sync() == 0  # unchanged tags are not fetched again
    # A replace on B with A's view: versions are per task and come from the store, not from memory.
    snap2, created = b.put("sentiment", _weights(make_file, 2.0), when=Preconditions(if_match=frozenset({1})))
    assert not created and snap2.version == 2
    a.sync()
    assert a.get("sentiment").version == 2 and a.get("sentiment").embeddings[0, 0].item() == 2.0


def test_a_stale_if_match_is_refused_with_the_current_version(tiny_geometry, make_file, endpoint, bucket):
    a, b = _replicas(tiny_geometry, endpoint, bucket)
    a.put("t", _weights(make_file, 1.0))
    b.sync()
    a.put("t", _weights(make_file, 2.0))  # B has not synced: its memory still says version 1
    with pytest.raises(PreconditionFailed) as caught:
        b.put("t", _weights(make_file, 3.0), when=Preconditions(if_match=frozenset({1})))
    assert caught.value.current_version == 2
    with pytest.raises(PreconditionFailed):
        b.put("t", _weights(make_file, 3.0), when=Preconditions(if_none_match="*"))
    with pytest.raises(PreconditionFailed):
        b.delete("t", when=Preconditions(if_match=frozenset({1})))
    a.sync()
    assert a.get("t").embeddings[0, 0].item() == 2.0  # nothing a refused write sent was stored


def test_versions_never_repeat_across_delete_and_recreate(tiny_geometry, make_file, endpoint, bucket):
    a, b = _replicas(tiny_geometry, endpoint, bucket)
    a.put("t", _weights(make_file, 1.0))
    a.put("t", _weights(make_file, 1.0))  # identical weights: a new version, new bytes, a new ETag
    b.delete("t")  # B never loaded it: the store, not B's memory, says it exists
    client = s3_client(endpoint)
    assert client.get_object(Bucket=bucket, Key=f"tasks/{TOMBSTONES}t")["Body"].read() == b"2"
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="tasks/t.")  # the object is gone
    a.sync()
    assert "t" not in a
    snap, created = b.put("t", _weights(make_file, 1.0))
    assert created and snap.version == 3
    with pytest.raises(UnknownTask):
        a.delete("nothing-here")


def test_racing_conditional_writers_never_lose_an_update(tiny_geometry, make_file, endpoint, bucket):
    """Each writer reads the version and writes If-Match it: every version is won by exactly one writer."""
    replicas = _replicas(tiny_geometry, endpoint, bucket, n=2)
    replicas[0].put("counter", _weights(make_file, 0.0))
    won: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def writer(registry: PromptRegistry, value: float) -> None:
        for _ in range(6):
            try:
                version = registry.backend._head("counter").version  # what a client would have read
                snap, _ = registry.put("counter", _weights(make_file, value),
                                       when=Preconditions(if_match=frozenset({version})))
                with lock:
                    won.append(snap.version)
            except PreconditionFailed:
                pass
            except Exception as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(replicas[i % 2], float(i))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(won) == len(set(won)) and won, won  # no version issued twice, some writes won
    final = replicas[0].backend._head("counter").version
    assert sorted(won) == list(range(2, final + 1))  # every version from 2 up was one writer's whole write


def test_an_object_written_by_another_tool_is_served_and_then_numbered(tiny_geometry, make_file, endpoint, bucket):
    client = s3_client(endpoint)
    client.put_object(Bucket=bucket, Key="tasks/by-hand.safetensors", Body=_weights(make_file, 5.0))
    client.put_object(Bucket=bucket, Key="tasks/broken.safetensors", Body=b"not safetensors")
    (a,) = _replicas(tiny_geometry, endpoint, bucket, n=1)
    a.sync()
    assert a.get("by-hand").version == 0
    assert a.describe("broken").error and "broken" not in a
    snap, created = a.put("by-hand", _weights(make_file, 6.0), when=Preconditions(if_match=frozenset({0})))
    assert snap.version == 1 and not created


def test_the_change_marker_moves_only_on_writes(tiny_geometry, make_file, endpoint, bucket):
    a, b = _replicas(tiny_geometry, endpoint, bucket)
    assert not b.backend.changed()  # no marker yet: nothing to follow
    a.put("t", _weights(make_file, 1.0))
    assert b.backend.changed() and not b.backend.changed()
    marker = json.loads(s3_client(endpoint).get_object(Bucket=bucket, Key=f"tasks/{CHANGES}")["Body"].read())
    assert marker["task"] == "t" and marker["version"] == 1
    a.delete("t")
    assert b.backend.changed()


def test_an_unreachable_store_keeps_memory_and_fails_writes_clearly(tiny_geometry, make_file, endpoint, bucket):
    proxy = TcpProxy(int(endpoint.rsplit(":", 1)[1]))
    try:
        store = ObjectStore(f"s3://{bucket}/p", client=s3_client(proxy.endpoint))
        registry = PromptRegistry(tiny_geometry, backend=store)
        registry.put("cached", _weights(make_file, 1.0))
        proxy.cut()
        with pytest.raises(StorageUnavailable, match="cannot be reached"):
            registry.put("new", _weights(make_file, 2.0))
        with pytest.raises(StorageUnavailable):
            registry.sync()
        with pytest.raises(StorageUnavailable):
            registry.delete("cached")
        assert registry.get("cached").version == 1 and "new" not in registry  # memory as it was
        proxy.restore()
        assert registry.put("new", _weights(make_file, 2.0))[0].version == 1
        registry.sync()
        assert sorted(d.task for d in registry.list()) == ["cached", "new"]
    finally:
        proxy.close()


def test_a_missing_bucket_is_named(tiny_geometry, make_file, endpoint):
    registry = PromptRegistry(tiny_geometry, backend=_store(endpoint, "no-such-bucket-here"))
    with pytest.raises(StorageUnavailable, match="no bucket 'no-such-bucket-here'"):
        registry.sync()


def test_nothing_imports_boto3_unless_an_object_store_is_used():
    ours = ("import sys, server.process.cli, server.config, prompt_store.registry, prompt_store.sync; "
            "assert 'boto3' not in sys.modules, 'boto3 imported'")
    subprocess.run([sys.executable, "-c", ours], check=True)
    # transformers imports accelerate, which imports boto3 on its own when it is installed; our backend
    # module is still loaded only for an s3:// store.
    app = "import sys, server.api.app; assert 'prompt_store.backends.s3' not in sys.modules, 'loaded'"
    subprocess.run([sys.executable, "-c", app], check=True)


def test_a_task_deleted_between_listing_and_reading_is_dropped(tiny_geometry, make_file, endpoint, bucket):
    a, b = _replicas(tiny_geometry, endpoint, bucket)
    a.put("fleeting", _weights(make_file, 1.0))
    a.put("stays", _weights(make_file, 2.0))
    b.sync()
    a.put("fleeting", _weights(make_file, 3.0))  # B's next listing sees a new tag...
    listing = b.backend.scan()
    a.delete("fleeting")  # ...but it is gone before B reads it
    b.backend.scan = lambda: listing  # the listing B took before the delete
    b.sync()  # no error: the poller would otherwise count an outage
    assert "fleeting" not in b and b.get("stays").version == 1


def test_the_poller_follows_the_marker_and_lists_in_full_now_and_then(tiny_geometry, make_file, endpoint, bucket):
    """A write whose marker update was lost (here: an object put without one) is found by the full listing."""
    import time

    from prompt_store.sync import StorePoller

    a, b = _replicas(tiny_geometry, endpoint, bucket)
    poller = StorePoller(b, interval_s=0.05, full_sync_s=1.0)
    poller.start()
    try:
        deadline = time.monotonic() + 10
        while not b.synced:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        a.put("marked", _weights(make_file, 1.0))
        while "marked" not in b:  # through the marker: within a few polls
            assert time.monotonic() < deadline, "the marker was not followed"
            time.sleep(0.01)
        s3_client(endpoint).put_object(Bucket=bucket, Key="tasks/unmarked.safetensors", Body=_weights(make_file, 2.0))
        written = time.monotonic()
        while "unmarked" not in b:
            assert time.monotonic() - written < 10, "the full listing did not find it"
            time.sleep(0.01)
        assert poller.failures == 0 and poller.seconds_since_success() is not None
    finally:
        poller.stop()


def test_a_put_that_lands_while_a_sync_lists_is_kept(tiny_geometry, make_file, endpoint, bucket):
    """The writer serves its own write at once, even when its poller listed the store just before it."""
    (b,) = _replicas(tiny_geometry, endpoint, bucket, n=1)
    listing_of = b.backend.scan

    def listing_then_a_put():
        listing = listing_of()  # taken before the put below
        b.put("fresh", _weights(make_file, 1.0))
        return listing

    b.backend.scan = listing_then_a_put
    b.sync()
    assert b.get("fresh").version == 1


def test_an_archived_object_fails_alone(tiny_geometry, make_file, endpoint, bucket):
    """An object the store refuses to read (archived: 403 InvalidObjectState) is that task's failure; the
    rest loads, and the replica becomes ready."""
    (a,) = _replicas(tiny_geometry, endpoint, bucket, n=1)
    a.put("fine", _weights(make_file, 1.0))
    s3_client(endpoint).put_object(Bucket=bucket, Key="tasks/archived.safetensors", Body=_weights(make_file, 2.0),
                                   StorageClass="GLACIER")
    (b,) = _replicas(tiny_geometry, endpoint, bucket, n=1)
    b.sync()
    assert b.synced and b.get("fine").version == 1
    assert "InvalidObjectState" in b.describe("archived").error and "archived" not in b


def test_a_task_deleted_elsewhere_stops_being_served_on_delete(tiny_geometry, make_file, endpoint, bucket):
    a, b = _replicas(tiny_geometry, endpoint, bucket)
    a.put("t", _weights(make_file, 1.0))
    b.sync()
    a.delete("t")
    with pytest.raises(UnknownTask):
        b.delete("t")  # 404: the store has no such task...
    assert "t" not in b  # ...and B no longer serves its stale copy


def test_versions_stay_above_the_tombstone_when_an_old_object_is_copied_back(tiny_geometry, make_file, endpoint,
                                                                             bucket):
    (a,) = _replicas(tiny_geometry, endpoint, bucket, n=1)
    client = s3_client(endpoint)
    a.put("t", _weights(make_file, 1.0))
    old = client.get_object(Bucket=bucket, Key="tasks/t.safetensors")
    a.put("t", _weights(make_file, 2.0))
    a.delete("t")  # the tombstone records 2
    client.put_object(Bucket=bucket, Key="tasks/t.safetensors", Body=old["Body"].read(), Metadata=old["Metadata"])
    assert a.put("t", _weights(make_file, 3.0))[0].version == 3  # not 2 again


def test_the_store_is_checked_for_conditional_writes(endpoint, bucket):
    store = _store(endpoint, bucket)
    assert store.check_conditional_writes()
    assert "Contents" not in s3_client(endpoint).list_objects_v2(Bucket=bucket)  # the probe is removed


def test_a_patch_reads_the_store_and_keeps_the_weights(tiny_geometry, make_file, endpoint, bucket):
    """PATCH on a replica that has not synced yet works from the store's bytes, conditional on their version."""
    a, b = _replicas(tiny_geometry, endpoint, bucket)
    first, _ = a.put("t", _weights(make_file, 1.0), defaults={"max_new_tokens": 5, "temperature": 0.5})
    patched = b.patch("t", {"defaults": {"temperature": None}, "description": "patched on B"})
    assert patched.version == 2 and patched.sha256 == first.sha256
    assert patched.defaults == {"max_new_tokens": 5} and patched.description == "patched on B"
    a.sync()
    assert a.get("t").defaults == {"max_new_tokens": 5} and a.get("t").version == 2
    with pytest.raises(PreconditionFailed):
        a.patch("t", {"description": "stale"}, when=Preconditions(if_match=frozenset({1})))
