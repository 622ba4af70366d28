"""A content-addressed blob store on a local directory.

Every blob is named by the sha256 of its bytes and lives at ``<root>/ab/cd/abcd...``. A write goes
to a temporary file in the blob's own directory, is flushed and fsynced, renamed over the final
name with ``os.replace`` and the directory is fsynced, so a reader sees either the whole blob or
no blob, whatever happens to the writing process. Reads check the hash again.

Digests are validated (64 lowercase hex characters) before they are turned into a path, so no
caller input is ever joined into a path.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from imagegen.errors import ImagegenError
from imagegen.settings import Settings, get_settings

logger = logging.getLogger(__name__)

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
#: prefix of the temporary files a write leaves behind when its process is killed
TEMP_PREFIX = ".tmp-"


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


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without O_RDONLY on directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


class BlobStore:
    """Content-addressed blobs in a local directory (``get_settings().blob_root`` by default).

    Safe to share between threads and processes: writes are atomic renames of complete,
    fsynced files and the content of a name never changes.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def open(cls, settings: Settings | None = None) -> BlobStore:
        """The blob store of this process's settings (``IMAGEGEN_HOME/blobs``)."""
        settings = settings or get_settings()
        return cls(settings.blob_root)

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    # -- paths -----------------------------------------------------------------------------------
    def path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (validated; the file may not exist)."""
        digest = validate_digest(digest)
        return self.root / digest[:2] / digest[2:4] / digest

    def _make_dirs(self, directory: Path) -> None:
        """Create the fan-out directories of a blob and make their entries durable."""
        missing: list[Path] = []
        current = directory
        while not current.exists() and current != self.root:
            missing.append(current)
            current = current.parent
        directory.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            _fsync_dir(created.parent)

    # -- the API ---------------------------------------------------------------------------------
    def put(self, data: bytes) -> str:
        """Store ``data`` and return its digest (idempotent: storing the same bytes is a no-op).

        An existing file with this name is checked; a corrupt one is replaced. Its modification
        time is refreshed, which tells ``gc`` that a writer is about to reference it.
        """
        data = bytes(data)
        digest = sha256_hex(data)
        final = self.path(digest)
        if final.exists():
            try:
                self._read_verified(digest, final)
            except (CorruptBlobError, BlobNotFoundError):
                logger.warning("blob %s was corrupt or vanished; writing it again", digest)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(final)
                return digest
        directory = final.parent
        self._make_dirs(directory)
        tmp = directory / f"{TEMP_PREFIX}{digest[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            with open(tmp, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        _fsync_dir(directory)
        logger.debug("stored blob %s (%d bytes)", digest, len(data))
        return digest

    def get(self, digest: str) -> bytes:
        """The bytes of blob ``digest``; raises ``CorruptBlobError`` when they no longer match."""
        return self._read_verified(digest, self.path(digest))

    def _read_verified(self, digest: str, path: Path) -> bytes:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(
                f"blob {digest} is not in the blob store at {self.root}; it was deleted or never "
                "stored (run the registry's gc/verify, or register the data again)"
            ) from None
        actual = sha256_hex(data)
        if actual != digest:
            raise CorruptBlobError(
                f"blob {digest} at {path} is corrupt: its bytes hash to {actual}. Restore the file "
                "from a backup, or delete it and register the data again"
            )
        return data

    def exists(self, digest: str) -> bool:
        """Whether a blob named ``digest`` is stored (its content is not checked)."""
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        """The size in bytes of blob ``digest``."""
        path = self.path(digest)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {digest} is not in the blob store at {self.root}") from None

    def mtime(self, digest: str) -> float:
        """The last time blob ``digest`` was written or re-put (seconds since the epoch)."""
        path = self.path(digest)
        try:
            return path.stat().st_mtime
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {digest} is not in the blob store at {self.root}") from None

    def delete(self, digest: str) -> int:
        """Remove blob ``digest``; returns the bytes freed (0 when it was not stored)."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        _fsync_dir(path.parent)
        logger.debug("deleted blob %s (%d bytes)", digest, size)
        return size

    def digests(self) -> Iterator[str]:
        """Every stored blob's digest (temporary files are skipped)."""
        if not self.root.is_dir():
            return
        for first in sorted(self.root.iterdir()):
            if not first.is_dir() or len(first.name) != 2:
                continue
            for second in sorted(first.iterdir()):
                if not second.is_dir() or len(second.name) != 2:
                    continue
                for entry in sorted(second.iterdir()):
                    name = entry.name
                    if DIGEST_RE.fullmatch(name) and name.startswith(first.name + second.name):
                        yield name

    def __iter__(self) -> Iterator[str]:
        return self.digests()

    def temp_files(self) -> list[Path]:
        """Temporary files left by writers that were killed (or are writing right now)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob(f"*/*/{TEMP_PREFIX}*") if p.is_file())

    def remove_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files older than ``older_than_s`` seconds; returns the bytes freed."""
        freed = 0
        cutoff = time.time() - older_than_s
        for tmp in self.temp_files():
            try:
                stat = tmp.stat()
                if stat.st_mtime > cutoff:
                    continue
                tmp.unlink()
            except FileNotFoundError:
                continue
            freed += stat.st_size
        return freed

    def files(self) -> list[str]:
        """Every file under the root as a relative POSIX path (blobs and temporary files)."""
        if not self.root.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
