"""The content-addressed blob store, on a real directory and on a real S3-compatible server (moto's).

The ``store`` fixture runs each backend-neutral test on both: ``IMAGEGEN_STORAGE_URL`` unset (the blobs
under ``IMAGEGEN_HOME/blobs``, as always) and set to a fresh bucket. What a bucket holds is checked with
boto3, independently of the obstore client the blob store uses.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from imagegen.blobstore import (
    TEMP_PREFIX,
    BlobNotFoundError,
    BlobStore,
    CorruptBlobError,
    InvalidDigestError,
)
from imagegen.settings import get_settings

from .storage.s3 import Bucket


@pytest.fixture
def store(storage: Bucket | None) -> BlobStore:
    return BlobStore.open()


@pytest.fixture
def local_store(isolated_home: Path) -> BlobStore:
    return BlobStore.open()


def stored_keys(store: BlobStore, bucket: Bucket | None) -> list[str]:
    """What the backend itself holds under the blob store's root (boto3 for a bucket, the directory else)."""
    if bucket is None:
        return sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file())
    return [key.removeprefix("blobs/") for key in bucket.keys()]


def test_open_uses_the_settings_blob_root(isolated_home: Path) -> None:
    store = BlobStore.open()
    assert store.root == get_settings().blob_root == isolated_home / "blobs"
    assert store.root.is_dir() and store.location == str(isolated_home / "blobs")


def test_open_uses_the_storage_url(s3_bucket: Bucket, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_STORAGE_URL", s3_bucket.url + "/team-a")
    get_settings.cache_clear()
    store = BlobStore.open()
    assert store.root is None and store.location == f"{s3_bucket.url}/team-a/blobs"
    digest = store.put(b"on a bucket")
    assert s3_bucket.keys() == [f"team-a/blobs/{digest[:2]}/{digest[2:4]}/{digest}"]
    assert not (isolated_home / "blobs").exists()
    with pytest.raises(TypeError, match="not a directory"):
        store.path(digest)


def test_put_get_round_trip_and_fan_out(store: BlobStore, storage: Bucket | None) -> None:
    data = b"hello blobs"
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    key = f"{digest[:2]}/{digest[2:4]}/{digest}"
    assert store.key(digest) == key and stored_keys(store, storage) == [key]
    assert store.objects.get(key) == data
    if storage is None:
        assert store.path(digest) == store.root / key and store.path(digest).read_bytes() == data
    assert store.get(digest) == data
    assert store.exists(digest)
    assert store.size(digest) == len(data)
    assert list(store.digests()) == [digest]
    assert store.temp_files() == []


def test_put_is_idempotent(store: BlobStore, storage: Bucket | None) -> None:
    first = store.put(b"same")
    second = store.put(bytearray(b"same"))
    assert first == second
    assert store.files() == stored_keys(store, storage) == [f"{first[:2]}/{first[2:4]}/{first}"]


def test_delete_purges_the_object(store: BlobStore, storage: Bucket | None) -> None:
    digest = store.put(b"x" * 100)
    kept = store.put(b"kept")
    assert store.delete(digest) == 100
    assert not store.exists(digest)
    assert store.delete(digest) == 0
    # gone from the backend itself (the bucket as boto3 lists it), not hidden by our client
    assert stored_keys(store, storage) == [store.key(kept)]
    with pytest.raises(BlobNotFoundError):
        store.get(digest)
    with pytest.raises(BlobNotFoundError):
        store.size(digest)


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "A" * 64,
        "a" * 63,
        "a" * 65,
        "",
        "g" * 64,
        "/" + "a" * 63,
        "a" * 64 + "\n",
        None,
        123,
    ],
)
def test_digests_are_validated_before_any_path_is_built(store: BlobStore, storage: Bucket | None, bad: object) -> None:
    store.put(b"present")
    before = stored_keys(store, storage)
    for call in (store.get, store.exists, store.size, store.delete, store.key):
        with pytest.raises(InvalidDigestError, match="64 lowercase hex"):
            call(bad)  # type: ignore[arg-type]
    assert stored_keys(store, storage) == before


def test_corrupted_blob_raises_a_clear_error_and_put_repairs_it(store: BlobStore, storage: Bucket | None) -> None:
    data = b"precious image bytes"
    digest = store.put(data)
    rot = b"precious image bytez"
    if storage is None:
        store.path(digest).write_bytes(rot)
    else:  # behind the client's back, as bit rot or a foreign writer would
        storage.raw_put(f"blobs/{store.key(digest)}", rot)
    with pytest.raises(CorruptBlobError, match="corrupt") as info:
        store.get(digest)
    assert digest in str(info.value) and "backup" in str(info.value)
    assert store.put(data) == digest  # writing the same content again heals it
    assert store.get(digest) == data


def test_put_refreshes_mtime_of_an_existing_blob(local_store: BlobStore) -> None:
    store = local_store
    digest = store.put(b"old blob")
    old = time.time() - 7200
    os.utime(store.path(digest), (old, old))
    assert store.mtime(digest) == pytest.approx(old)
    store.put(b"old blob")
    assert store.mtime(digest) > old + 3600


def test_put_refreshes_the_write_time_of_an_object(s3_bucket: Bucket) -> None:
    store = BlobStore(s3_bucket.url + "/blobs")
    digest = store.put(b"old blob")
    first = store.mtime(digest)
    time.sleep(1.1)  # S3's Last-Modified has whole seconds
    store.put(b"old blob")
    assert store.mtime(digest) >= first + 1


def test_temp_files_of_killed_writers_are_removed(local_store: BlobStore) -> None:
    store = local_store
    digest = store.put(b"a")
    tmp = store.path(digest).parent / f"{TEMP_PREFIX}deadbeef-1-abcd"
    tmp.write_bytes(b"half written")
    assert store.temp_files() == [tmp.relative_to(store.root).as_posix()]
    assert list(store.digests()) == [digest]  # never listed as a blob
    assert store.remove_temp_files(older_than_s=3600) == 0  # too young: a writer may own it
    assert store.remove_temp_files(older_than_s=0) == len(b"half written")
    assert store.temp_files() == []


def test_concurrent_puts_of_the_same_and_different_bytes(store: BlobStore) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(20):
                store.put(b"shared")
                store.put(f"own-{k}-{i}".encode())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(list(store.digests())) == 1 + 6 * 20
    assert store.temp_files() == []
    for digest in store.digests():
        store.get(digest)  # every one verifies


def test_a_blob_above_the_multipart_size_round_trips(store: BlobStore, storage: Bucket | None) -> None:
    data = os.urandom(6 * 1024 * 1024 + 7)  # above obstore's 5 MiB chunk: a multipart upload on a bucket
    digest = store.put(data)
    assert store.get(digest) == data and store.size(digest) == len(data)
    assert stored_keys(store, storage) == [store.key(digest)]
    if storage is not None:  # S3 marks a multipart object's ETag with its part count ("...-2")
        etag = storage.client.head_object(Bucket=storage.name, Key=f"blobs/{store.key(digest)}")["ETag"]
        assert etag.strip('"').endswith("-2"), etag
