"""Where bytes live: one object-store interface over a local directory or an ``s3://``, ``gs://`` or ``az://`` URL.

``IMAGEGEN_STORAGE_URL`` names the storage root; unset, it is ``IMAGEGEN_HOME`` on the local disk, exactly the
layout of before (registry blobs under ``blobs/``, job images under ``serve/results/``), so existing homes keep
working untouched. On a cluster every node points at the same bucket, so an image rendered on one node is
fetched through another and a character registered through one ingress replica renders on any renderer.

Two backends, one interface (``ObjectStore``: ``put``, ``get``, ``head``, ``delete``, ``list``):

- ``LocalObjects``: files under a directory. A put writes a temporary file next to the final name, fsyncs it,
  renames it over the final name (``os.replace``) and fsyncs the directory: a reader sees the whole object or
  none, and a power cut after the put returned loses nothing (the registry's kill test relies on it). This is the
  code the blob store always had; obstore's ``LocalStore`` renames a staged file too but does not fsync, and its
  staging files would not be the ones ``gc`` knows how to sweep, so the local disk keeps its own backend.
- ``RemoteObjects``: any URL obstore understands (``s3://bucket/prefix``, ``gs://bucket/prefix``,
  ``az://container/prefix``; ``memory:///`` for experiments), through one obstore client per root. A put is
  one PUT of the whole object (a multipart upload above obstore's chunk size, which the service also publishes
  only when it completes): S3, GCS and Azure Blob never show a partly written object, so no temporary key is
  needed and a killed writer leaves nothing behind. Credentials and endpoints come from each cloud's own
  environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``,
  ``AWS_ALLOW_HTTP`` for an S3-compatible server; ``GOOGLE_SERVICE_ACCOUNT``; ``AZURE_STORAGE_ACCOUNT_NAME``,
  ``AZURE_STORAGE_ACCOUNT_KEY`` ...), which obstore reads itself.

Why obstore rather than fsspec: one small compiled dependency (the Rust ``object_store`` crate, the one
Apache Arrow and DataFusion use) builds S3, GCS and Azure clients from a URL with no extra packages
per cloud (fsspec needs s3fs, gcsfs and adlfs, each with its own aiohttp / botocore stack), has no hidden
local cache or listing cache that could serve a deleted object back, and its calls map one to one onto the
object operations (PUT, GET, HEAD, DELETE, LIST) whose atomicity we rely on.

Keys are relative POSIX paths built by our own code (the blob store validates digests first); they are
checked once more here, so nothing outside a root can ever be named. Errors: a missing object is
``ObjectNotFoundError``; an unreachable or refusing store is ``StorageUnavailableError`` (one line naming the
storage root and the operation, HTTP 503), never a stack of cloud-client text.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from imagegen.errors import ConfigError, ImagegenError

log = logging.getLogger(__name__)

#: prefix of the temporary files a local put leaves behind when its process is killed
TEMP_PREFIX = ".tmp-"
#: the key a readiness probe looks up (HEAD; missing is fine, an unreachable or refusing store is not)
PING_KEY = ".ping"
#: URL schemes served by obstore (the rest of a URL is the bucket / container and a key prefix)
REMOTE_SCHEMES = frozenset({"s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "memory"})
_KEY_PART = re.compile(r"^[A-Za-z0-9_.-]+$")


class StorageError(ImagegenError):
    """Base class of the object store's errors."""

    code = "storage_error"


class ObjectNotFoundError(StorageError):
    """No object with this key is stored."""

    code = "not_found"


class StorageUnavailableError(StorageError):
    """The object store could not be reached, refused the credentials, or failed the operation."""

    code = "storage_unavailable"


class StorageConfigError(ConfigError):
    """``IMAGEGEN_STORAGE_URL`` is not a location this code can store objects at."""

    code = "config_error"


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key (relative to the store's root), size in bytes and last write time."""

    key: str
    size: int
    modified: float


def check_key(key: str) -> str:
    """``key`` if it is a relative POSIX path of plain segments (no ``..``, no leading ``/``), else ``ValueError``."""
    parts = key.split("/")
    if not key or not all(_KEY_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        raise ValueError(f"{key!r} is not an object key (relative path of [A-Za-z0-9_.-] segments)")
    return key


class ObjectStore(ABC):
    """Objects named by relative keys under one root. Implementations are safe to share between threads."""

    #: the root as messages show it (a path or a URL without credentials)
    location: str

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` atomically (readers see the old object, or the whole new one)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes at ``key``; ``ObjectNotFoundError`` when there are none."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and last write time of ``key`` (None: not stored)."""

    @abstractmethod
    def delete(self, key: str) -> int:
        """Remove ``key`` for good; returns the bytes freed (0: it was not stored)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with the directory ``prefix`` (temporary files excluded)."""

    @abstractmethod
    def child(self, prefix: str) -> ObjectStore:
        """The same storage with keys relative to ``prefix`` (``blobs``, ``serve/results``)."""

    def ping(self) -> None:
        """Reach the store (a readiness probe): ``StorageUnavailableError`` when it cannot be used."""
        self.head(PING_KEY)

    def refresh(self, key: str, data: bytes) -> bool:
        """When ``key`` already holds exactly ``data``: mark it as just written and return True (skip the put).

        False means "put it": the default, for stores where rewriting is the only way to refresh a write time.
        """
        return False

    def temp_files(self) -> list[str]:
        """Keys of temporary files left by killed writers (none where puts are atomic server-side)."""
        return []

    def remove_temp_files(self, older_than_s: float) -> int:
        """Delete temporary files older than ``older_than_s`` seconds; returns the bytes freed."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


# --------------------------------------------------------------------------------------------- local disk


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


class LocalObjects(ObjectStore):
    """Objects as files under ``root``: fsynced temporary file, ``os.replace``, fsynced directory."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = str(self.root)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _make_dirs(self, directory: Path) -> None:
        """Create the fan-out directories of an object and make their entries durable."""
        missing: list[Path] = []
        current = directory
        while not current.exists() and current != self.root:
            missing.append(current)
            current = current.parent
        directory.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            _fsync_dir(created.parent)

    def put(self, key: str, data: bytes) -> None:
        final = self.path(key)
        directory = final.parent
        self._make_dirs(directory)
        tmp = directory / f"{TEMP_PREFIX}{final.name[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
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

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFoundError(f"no object {key} in {self.location}") from None

    def ping(self) -> None:
        if not (self.root.is_dir() and os.access(self.root, os.W_OK | os.X_OK)):
            raise StorageUnavailableError(f"the blob directory {self.root} is missing or not writable")

    def head(self, key: str) -> ObjectInfo | None:
        path = self.path(key)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, stat.st_size, stat.st_mtime) if path.is_file() else None

    def refresh(self, key: str, data: bytes) -> bool:
        path = self.path(key)
        try:
            same = path.read_bytes() == data
        except (FileNotFoundError, IsADirectoryError):
            return False
        if same:
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
        return same

    def delete(self, key: str) -> int:
        path = self.path(key)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        _fsync_dir(path.parent)
        return size

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.name.startswith(TEMP_PREFIX):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # deleted while listing
                continue
            if path.is_file():
                yield ObjectInfo(path.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime)

    def child(self, prefix: str) -> LocalObjects:
        return LocalObjects(self.path(prefix))

    def temp_files(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob(f"{TEMP_PREFIX}*") if p.is_file())

    def remove_temp_files(self, older_than_s: float) -> int:
        freed = 0
        cutoff = time.time() - older_than_s
        for key in self.temp_files():
            tmp = self.root / key
            try:
                stat = tmp.stat()
                if stat.st_mtime > cutoff:
                    continue
                tmp.unlink()
            except FileNotFoundError:
                continue
            freed += stat.st_size
        return freed


# --------------------------------------------------------------------------------------------- object stores


def _hide_credentials(url: str) -> str:
    """A URL as messages show it: any user / password part and the query string dropped."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class RemoteObjects(ObjectStore):
    """Objects in a bucket / container through obstore; ``prefix`` is the key prefix inside the store."""

    def __init__(self, store: Any, root: str, prefix: str = ""):
        self._store = store
        self._root = root.rstrip("/")
        self.prefix = prefix.strip("/")
        self.location = self._root + (f"/{self.prefix}" if self.prefix else "")

    @classmethod
    def from_url(cls, url: str) -> RemoteObjects:
        """One obstore client for ``url`` (its bucket and path prefix), configured from the environment."""
        try:
            from obstore.store import from_url
        except ImportError as exc:  # pragma: no cover - obstore is a dependency
            raise StorageConfigError(f"IMAGEGEN_STORAGE_URL {_hide_credentials(url)} needs obstore ({exc})") from None
        options: dict[str, Any] = {}
        if urlsplit(url).scheme.lower() != "memory":
            # a store that is down fails a request in seconds (one line, HTTP 503), not after obstore's default
            # three minutes of retries. No client_options: they would replace the ones read from the environment
            # (AWS_ALLOW_HTTP ...); object_store's own 5 s connect and 30 s request timeouts stay.
            options = {"retry_config": {"max_retries": 3, "retry_timeout": timedelta(seconds=20)}}
        try:
            store = from_url(url, **options)
        except Exception as exc:
            raise StorageConfigError(
                f"IMAGEGEN_STORAGE_URL {_hide_credentials(url)} is not usable: {_first_line(exc)}"
            ) from None
        return cls(store, _hide_credentials(url))

    def _key(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unavailable(self, operation: str, key: str, exc: BaseException) -> StorageUnavailableError:
        # the store's URL and the cloud's answer go to the operator's log; HTTP clients see the message
        log.error("the object store %s failed to %s %s: %s", self.location, operation, key, _first_line(exc))
        return StorageUnavailableError(
            f"the object store failed to {operation} {key}; the service log names the store and the cause "
            "(an operator checks IMAGEGEN_STORAGE_URL, its credentials and that the bucket exists)"
        )

    def put(self, key: str, data: bytes) -> None:
        import obstore

        try:
            obstore.put(self._store, self._key(key), data)
        except Exception as exc:
            raise self._unavailable("store", key, exc) from None

    def get(self, key: str) -> bytes:
        import obstore

        try:
            return bytes(obstore.get(self._store, self._key(key)).bytes())
        except _NOT_FOUND:
            raise ObjectNotFoundError(f"no object {key} in {self.location}") from None
        except Exception as exc:
            raise self._unavailable("read", key, exc) from None

    def head(self, key: str) -> ObjectInfo | None:
        import obstore

        try:
            meta = obstore.head(self._store, self._key(key))
        except _NOT_FOUND:
            return None
        except Exception as exc:
            raise self._unavailable("look up", key, exc) from None
        return ObjectInfo(key, int(meta["size"]), meta["last_modified"].timestamp())

    def delete(self, key: str) -> int:
        import obstore

        info = self.head(key)
        if info is None:
            return 0
        try:
            obstore.delete(self._store, self._key(key))
        except _NOT_FOUND:
            return 0
        except Exception as exc:
            raise self._unavailable("delete", key, exc) from None
        return info.size

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        import obstore

        full = self._key(prefix) if prefix else (self.prefix or None)
        skip = len(self.prefix) + 1 if self.prefix else 0
        try:
            chunks = list(obstore.list(self._store, full))
        except Exception as exc:
            raise self._unavailable("list", prefix or "/", exc) from None
        found = [
            ObjectInfo(meta["path"][skip:], int(meta["size"]), meta["last_modified"].timestamp())
            for chunk in chunks
            for meta in chunk
        ]
        yield from sorted(found, key=lambda info: info.key)

    def child(self, prefix: str) -> RemoteObjects:
        return RemoteObjects(self._store, self._root, self._key(prefix))


def _not_found() -> tuple[type[BaseException], ...]:
    try:
        from obstore.exceptions import NotFoundError
    except ImportError:  # pragma: no cover - obstore is a dependency
        return (FileNotFoundError,)
    return (FileNotFoundError, NotFoundError)


#: what obstore raises for a missing object (``FileNotFoundError``; its own ``NotFoundError`` in some versions)
_NOT_FOUND = _not_found()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# --------------------------------------------------------------------------------------------- opening


def open_storage(location: str | os.PathLike[str]) -> ObjectStore:
    """The object store at ``location``: a directory path (or ``file://`` URL), or a URL obstore serves.

    Any other scheme is one ``StorageConfigError`` line listing the supported ones.
    """
    if isinstance(location, os.PathLike):
        return LocalObjects(location)
    text = str(location).strip()
    if not text:
        raise StorageConfigError("the storage location is empty: set IMAGEGEN_STORAGE_URL or leave it unset")
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if not scheme:
        return LocalObjects(Path(text).expanduser())
    if scheme == "file":
        return LocalObjects(Path(urlsplit(text).path))
    if scheme in REMOTE_SCHEMES:
        return RemoteObjects.from_url(text)
    raise StorageConfigError(
        f"IMAGEGEN_STORAGE_URL {_hide_credentials(text)} has the scheme {scheme!r}; use a directory, file://, "
        "s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"
    )
