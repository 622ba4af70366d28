"""The content-addressed blob store, on a real directory."""

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


@pytest.fixture
def store(isolated_home: Path) -> BlobStore:
    return BlobStore.open()


def test_open_uses_the_settings_blob_root(isolated_home: Path) -> None:
    store = BlobStore.open()
    assert store.root == get_settings().blob_root == isolated_home / "blobs"
    assert store.root.is_dir()


def test_put_get_round_trip_and_fan_out(store: BlobStore) -> None:
    data = b"hello blobs"
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    path = store.root / digest[:2] / digest[2:4] / digest
    assert path.is_file() and path.read_bytes() == data
    assert store.path(digest) == path
    assert store.get(digest) == data
    assert store.exists(digest)
    assert store.size(digest) == len(data)
    assert list(store.digests()) == [digest]
    assert store.temp_files() == []


def test_put_is_idempotent(store: BlobStore) -> None:
    first = store.put(b"same")
    second = store.put(bytearray(b"same"))
    assert first == second
    assert store.files() == [f"{first[:2]}/{first[2:4]}/{first}"]


def test_delete(store: BlobStore) -> None:
    digest = store.put(b"x" * 100)
    assert store.delete(digest) == 100
    assert not store.exists(digest)
    assert store.delete(digest) == 0
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
def test_digests_are_validated_before_any_path_is_built(store: BlobStore, bad: object) -> None:
    before = sorted(p.as_posix() for p in store.root.rglob("*"))
    for call in (store.get, store.exists, store.size, store.delete, store.path):
        with pytest.raises(InvalidDigestError, match="64 lowercase hex"):
            call(bad)  # type: ignore[arg-type]
    assert sorted(p.as_posix() for p in store.root.rglob("*")) == before


def test_corrupted_blob_raises_a_clear_error_and_put_repairs_it(store: BlobStore) -> None:
    data = b"precious image bytes"
    digest = store.put(data)
    store.path(digest).write_bytes(b"precious image bytez")
    with pytest.raises(CorruptBlobError, match="corrupt") as info:
        store.get(digest)
    assert digest in str(info.value) and "backup" in str(info.value)
    assert store.put(data) == digest  # writing the same content again heals it
    assert store.get(digest) == data


def test_put_refreshes_mtime_of_an_existing_blob(store: BlobStore) -> None:
    digest = store.put(b"old blob")
    old = time.time() - 7200
    os.utime(store.path(digest), (old, old))
    assert store.mtime(digest) == pytest.approx(old)
    store.put(b"old blob")
    assert store.mtime(digest) > old + 3600


def test_temp_files_of_killed_writers_are_removed(store: BlobStore) -> None:
    digest = store.put(b"a")
    tmp = store.path(digest).parent / f"{TEMP_PREFIX}deadbeef-1-abcd"
    tmp.write_bytes(b"half written")
    assert store.temp_files() == [tmp]
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
