"""Storage by URL: the object-store interface, and what lives in a bucket when ``IMAGEGEN_STORAGE_URL`` is set.

Real backends only: a directory, and moto's S3-compatible HTTP server (``tests/storage/s3.py``). Two "nodes"
are two ``IMAGEGEN_HOME`` directories sharing one database and one storage URL: what one writes, the other
reads, and a deletion through one leaves nothing in the bucket (checked with boto3, not our client).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from imagegen.blobstore import BlobNotFoundError, BlobStore
from imagegen.identity.registry import Registry
from imagegen.serve.errors import status_for
from imagegen.serve.store import ServeStore
from imagegen.settings import get_settings
from imagegen.storage import (
    LocalObjects,
    ObjectNotFoundError,
    RemoteObjects,
    StorageConfigError,
    StorageUnavailableError,
    check_key,
    open_storage,
)

from ..identity._helpers import make_character, make_refs
from .s3 import Bucket


def node(home: Path, monkeypatch: pytest.MonkeyPatch, database: str, storage_url: str) -> None:
    """Make this process look like one node: its own IMAGEGEN_HOME, the cluster's database and storage."""
    monkeypatch.setenv("IMAGEGEN_HOME", str(home))
    monkeypatch.setenv("IMAGEGEN_DATABASE_URL", database)
    monkeypatch.setenv("IMAGEGEN_STORAGE_URL", storage_url)
    get_settings.cache_clear()


def test_locations_open_the_right_backend(tmp_path: Path) -> None:
    assert isinstance(open_storage(tmp_path / "a"), LocalObjects) and (tmp_path / "a").is_dir()
    assert open_storage(str(tmp_path / "b")).location == str(tmp_path / "b")
    assert open_storage(f"file://{tmp_path / 'c'}").location == str(tmp_path / "c")
    memory = open_storage("memory:///")
    assert isinstance(memory, RemoteObjects)
    memory.child("blobs").put("x/y", b"1")
    assert [info.key for info in memory.list()] == ["blobs/x/y"]
    for bad in ("ftp://host/dir", "http://example.com/bucket", "   "):
        with pytest.raises(StorageConfigError) as info:
            open_storage(bad)
        assert "\n" not in str(info.value) and "IMAGEGEN_STORAGE_URL" in str(info.value)


@pytest.mark.parametrize("key", ["", "../x", "a/../b", "/abs", "a//b", "a/./b", "a\\b", "a/b\n"])
def test_keys_never_leave_the_root(tmp_path: Path, key: str) -> None:
    store = open_storage(tmp_path / "root")
    with pytest.raises(ValueError, match="not an object key"):
        check_key(key)
    for call in (store.get, store.head, store.delete, lambda k: store.put(k, b"x")):
        with pytest.raises(ValueError):
            call(key)
    assert list(tmp_path.rglob("*")) == [tmp_path / "root"]


def test_a_missing_object_and_a_missing_blob(s3_bucket: Bucket, tmp_path: Path) -> None:
    store = open_storage(s3_bucket.url)
    store.ping()  # a reachable bucket answers the probe, whether or not the probed key exists
    open_storage(tmp_path / "dir").ping()
    gone = LocalObjects(tmp_path / "gone")
    (tmp_path / "gone").rmdir()  # an unmounted volume, a deleted home
    with pytest.raises(StorageUnavailableError, match="missing or not writable"):
        gone.ping()
    with pytest.raises(ObjectNotFoundError):
        store.get("no/such/key")
    assert store.head("no/such/key") is None and store.delete("no/such/key") == 0
    with pytest.raises(BlobNotFoundError, match="not in the blob store"):
        BlobStore(store.child("blobs")).get("a" * 64)


def test_an_unreachable_store_is_one_line_and_a_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    store = BlobStore("s3://secret-bucket-name/blobs")
    calls = (store.ping, lambda: store.put(b"x"), lambda: store.get("b" * 64), lambda: list(store.digests()))
    for call in calls:
        with pytest.raises(StorageUnavailableError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "secret-bucket-name" not in message  # HTTP clients see the message
        assert status_for(info.value.code) == 503
    assert "secret-bucket-name" in caplog.text  # the operator's log names the store


def test_the_registry_on_a_bucket_is_shared_by_nodes_and_purged_on_delete(
    s3_bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = f"sqlite:///{tmp_path / 'cluster.db'}"
    node(tmp_path / "node-a", monkeypatch, database, s3_bucket.url + "/prod")
    with Registry.open() as on_a:
        stored = on_a.characters.register(make_character("mia"), make_refs(3))
        on_a.characters.register(make_character("noa"), make_refs(1, start=10))
        on_a.conditioning.put("mia", "pulid-flux", "v1", "w", {"id": torch.arange(3.0)}, expected_version=1)
    digests = {ref.digest for ref in stored.references}
    keys = s3_bucket.keys()
    assert len(keys) == 3 + 1 + 1 and all(key.startswith("prod/blobs/") for key in keys)
    assert not (tmp_path / "node-a" / "blobs").exists()  # nothing on the node's disk

    node(tmp_path / "node-b", monkeypatch, database, s3_bucket.url + "/prod")
    with Registry.open() as on_b:
        assert on_b.blobs.location == f"{s3_bucket.url}/prod/blobs"
        for ref, given in zip(on_b.characters.get("mia").references, make_refs(3), strict=True):
            assert on_b.characters.reference_bytes("mia", ref.digest) == given.data
        assert torch.equal(on_b.conditioning.get("mia", "pulid-flux", "v1", "w")["id"], torch.arange(3.0))
        report = on_b.characters.delete("mia")
        assert report.blobs_removed == 4 and on_b.verify() == []
    left = s3_bucket.keys()
    assert len(left) == 1 and not any(digest in key for key in left for digest in digests)  # purged for good


def test_job_images_written_on_one_node_are_served_by_another_and_purged(
    s3_bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = f"sqlite:///{tmp_path / 'cluster.db'}"
    node(tmp_path / "node-a", monkeypatch, database, s3_bucket.url)
    with ServeStore.open() as on_a:
        on_a.create_job("j" * 32, "key-1", "tiny-flux", {"prompt": "p"}, 1, tenant="default", character="mia")
        [job] = on_a.claim_jobs("ingress-a", limit=1, max_attempts=2)
        digest = on_a.results.put(b"\x89PNG a rendered image")
        assert on_a.finish_job(job.id, "ingress-a", {"images": [{"index": 0, "digest": digest}]})
    assert s3_bucket.keys() == [f"serve/results/{digest[:2]}/{digest[2:4]}/{digest}"]

    node(tmp_path / "node-b", monkeypatch, database, s3_bucket.url)
    with ServeStore.open() as on_b:
        stored = on_b.get_job(job.id).result["images"][0]
        assert set(stored) == {"index", "digest"}  # the row names bytes by digest, never by a node's path
        assert on_b.results.get(stored["digest"]) == b"\x89PNG a rendered image"
        assert on_b.purge_character("mia")["results"] == 1
    assert s3_bucket.keys() == []
    assert not (tmp_path / "node-a" / "serve" / "results").exists()
