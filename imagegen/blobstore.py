"""A content-addressed blob store over an object store (``imagegen.storage``): a local directory or a bucket.

Every blob is named by the sha256 of its bytes and lives at the key ``ab/cd/abcd...`` under its store's root:
``<IMAGEGEN_HOME>/blobs`` by default, ``<IMAGEGEN_STORAGE_URL>/blobs`` when a storage URL is set (the registry's
blobs; job images use ``serve/results`` the same way). A put is atomic on every backend (a fsynced temporary
file renamed into place on disk; one PUT on S3 / GCS / Azure, which never show a partial object), so a reader
sees either the whole blob or no blob, whatever happens to the writing process. Every read checks the hash
again: a blob whose bytes changed is ``CorruptBlobError``, never bad bytes. A delete removes the object from
the store itself (on a bucket: the object, not a marker over it, as long as the bucket does not keep object
versions; see README "Storage").

Digests are validated (64 lowercase hex characters) before they are turned into a key, so no caller input is
ever joined into a path or an object name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from imagegen.errors import ImagegenError
from imagegen.settings import Settings, get_settings
from imagegen.storage import TEMP_PREFIX, LocalObjects, ObjectInfo, ObjectNotFoundError, ObjectStore, open_storage

__all__ = [
    "TEMP_PREFIX",
    "BlobNotFoundError",
    "BlobStore",
    "BlobStoreError",
    "CorruptBlobError",
    "InvalidDigestError",
    "sha256_hex",
    "validate_digest",
]

logger = logging.getLogger(__name__)

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


class BlobStoreError(ImagegenError):
    """Base class of the blob store's errors."""

    code = "blob_store_error"


class InvalidDigestError(BlobStoreError):
    """A string that is not a sha256 hex digest was used as a blob name."""

    code = "invalid_digest"
    field = "digest"


class BlobNotFoundError(BlobStoreError):
    """No blob with this digest is stored."""

    code = "blob_not_found"
    field = "digest"


class CorruptBlobError(BlobStoreError):
    """A stored blob whose bytes no longer hash to its name."""

    code = "corrupt_blob"
    field = "digest"


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as 64 lowercase hex characters (a blob's name)."""
    return hashlib.sha256(data).hexdigest()


def validate_digest(digest: object) -> str:
    """Return ``digest`` if it is 64 lowercase hex characters, else raise ``InvalidDigestError``."""
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        shown = repr(digest)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise InvalidDigestError(
            f"{shown} is not a blob digest; a digest is the sha256 of the blob's bytes written as "
            "64 lowercase hex characters (as returned by BlobStore.put)"
        )
    return digest


class BlobStore:
    """Content-addressed blobs in an object store (``BlobStore.open()``: the registry's, from the settings).

    ``BlobStore(location)`` takes a directory, a storage URL (``s3://bucket/prefix/blobs``) or an
    ``ObjectStore``. Safe to share between threads and processes: puts are atomic and the content of a name
    never changes.
    """

    def __init__(self, location: ObjectStore | str | os.PathLike[str]):
        self.objects = location if isinstance(location, ObjectStore) else open_storage(location)

    @classmethod
    def open(cls, settings: Settings | None = None, area: str = "blobs") -> BlobStore:
        """The blob store ``area`` of this process's storage (``IMAGEGEN_STORAGE_URL``, else ``IMAGEGEN_HOME``)."""
        settings = settings or get_settings()
        return cls(open_storage(settings.storage_root).child(area))

    @property
    def location(self) -> str:
        """Where the blobs are, for operator messages (a path or a URL without credentials)."""
        return self.objects.location

    @property
    def root(self) -> Path | None:
        """The directory of a blob store on the local disk (None for a bucket)."""
        return self.objects.root if isinstance(self.objects, LocalObjects) else None

    def __repr__(self) -> str:
        return f"BlobStore({self.location!r})"

    # -- names -----------------------------------------------------------------------------------
    @staticmethod
    def key(digest: str) -> str:
        """The object key of blob ``digest`` (validated; the object may not exist)."""
        digest = validate_digest(digest)
        return f"{digest[:2]}/{digest[2:4]}/{digest}"

    def path(self, digest: str) -> Path:
        """Where blob ``digest`` lives on the local disk (a bucket has no paths: ``TypeError``)."""
        key = self.key(digest)
        if not isinstance(self.objects, LocalObjects):
            raise TypeError(f"{self.location} is not a directory; blobs there have keys (BlobStore.key), not paths")
        return self.objects.path(key)

    # -- the API ---------------------------------------------------------------------------------
    def put(self, data: bytes) -> str:
        """Store ``data`` and return its digest (idempotent: storing the same bytes again changes nothing).

        An intact copy already stored is kept and its write time refreshed (on a bucket the bytes are put
        again, which is how an object's time is refreshed there); a corrupt one is replaced. The fresh write
        time tells ``gc`` that a writer is about to reference the blob.
        """
        data = bytes(data)
        digest = sha256_hex(data)
        key = self.key(digest)
        if self.objects.refresh(key, data):
            return digest
        self.objects.put(key, data)
        logger.debug("stored blob %s (%d bytes) in %s", digest, len(data), self.location)
        return digest

    def get(self, digest: str) -> bytes:
        """The bytes of blob ``digest``; raises ``CorruptBlobError`` when they no longer match."""
        key = self.key(digest)
        try:
            data = self.objects.get(key)
        except ObjectNotFoundError:
            raise BlobNotFoundError(
                f"blob {digest} is not in the blob store at {self.location}; it was deleted or never "
                "stored (run the registry's gc/verify, or register the data again)"
            ) from None
        actual = sha256_hex(data)
        if actual != digest:
            raise CorruptBlobError(
                f"blob {digest} at {self.location}/{key} is corrupt: its bytes hash to {actual}. Restore it "
                "from a backup, or delete it and register the data again"
            )
        return data

    def ping(self) -> None:
        """Reach the store (``/readyz``): ``StorageUnavailableError`` when it cannot be used from this node."""
        self.objects.ping()

    def exists(self, digest: str) -> bool:
        """Whether a blob named ``digest`` is stored (its content is not checked)."""
        return self.objects.head(self.key(digest)) is not None

    def _info(self, digest: str) -> ObjectInfo:
        info = self.objects.head(self.key(digest))
        if info is None:
            raise BlobNotFoundError(f"blob {digest} is not in the blob store at {self.location}")
        return info

    def size(self, digest: str) -> int:
        """The size in bytes of blob ``digest``."""
        return self._info(digest).size

    def mtime(self, digest: str) -> float:
        """The last time blob ``digest`` was written or re-put (seconds since the epoch)."""
        return self._info(digest).modified

    def delete(self, digest: str) -> int:
        """Remove blob ``digest`` from the store; returns the bytes freed (0 when it was not stored)."""
        size = self.objects.delete(self.key(digest))
        if size:
            logger.debug("deleted blob %s (%d bytes) from %s", digest, size, self.location)
        return size

    def digests(self) -> Iterator[str]:
        """Every stored blob's digest (temporary files and foreign objects are skipped)."""
        for info in self.objects.list():
            parts = info.key.split("/")
            if len(parts) == 3 and DIGEST_RE.fullmatch(parts[2]) and parts[2].startswith(parts[0] + parts[1]):
                yield parts[2]

    def __iter__(self) -> Iterator[str]:
        return self.digests()

    def temp_files(self) -> list[str]:
        """Keys of temporary files left by writers that were killed (or are writing right now)."""
        return self.objects.temp_files()

    def remove_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files older than ``older_than_s`` seconds; returns the bytes freed."""
        return self.objects.remove_temp_files(older_than_s)

    def files(self) -> list[str]:
        """Every object under the root as a key (blobs and temporary files)."""
        return sorted({info.key for info in self.objects.list()} | set(self.temp_files()))
