"""The character registry: one database, one blob store, and a store per kind of data.

``Registry.open()`` opens the registry of this process's settings; its stores share one
``RegistryDatabase`` (engine, schema revision check, blob store, transactions):

- ``registry.characters`` (``CharacterStore``): characters, reference images, face analyses and
  identity centroids; register, change, delete.
- ``registry.conditioning`` (``ConditioningStore``): identity tensors cached per method.
- ``registry.gallery`` (``ProtectedGallery``): embeddings of people no character may resemble.

The registry itself keeps what spans the stores: ``gc()``, ``verify()``, ``dump()``, ``close()``.

Modules: ``schema`` (the ORM rows), ``database`` (``RegistryDatabase``), ``characters``,
``conditioning``, ``gallery``. The schema's revisions live in ``imagegen.migrations``: opening a
fresh database creates it at head, an older one is refused until ``imagegen db upgrade`` ran.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import URL, Engine

from imagegen.blobstore import BlobNotFoundError, BlobStore, BlobStoreError
from imagegen.identity.models import (
    DuplicateCharacterError,
    InvalidCharacterError,
    InvalidCharacterIdError,
    InvalidEmbeddingError,
    InvalidReferenceError,
    ProvenanceError,
    RegistryError,
    StaleConditioningError,
    UnknownCharacterError,
    UnknownProtectedIdentityError,
)
from imagegen.identity.registry.characters import CharacterStore, DeleteReport
from imagegen.identity.registry.conditioning import ConditioningEntry, ConditioningStore
from imagegen.identity.registry.database import RegistryDatabase
from imagegen.identity.registry.gallery import ProtectedGallery
from imagegen.identity.registry.schema import Base
from imagegen.settings import Settings, get_settings

__all__ = [
    "CharacterStore",
    "ConditioningEntry",
    "ConditioningStore",
    "DeleteReport",
    "DuplicateCharacterError",
    "GcReport",
    "InvalidCharacterError",
    "InvalidCharacterIdError",
    "InvalidEmbeddingError",
    "InvalidReferenceError",
    "ProtectedGallery",
    "ProvenanceError",
    "Registry",
    "RegistryDatabase",
    "RegistryError",
    "StaleConditioningError",
    "UnknownCharacterError",
    "UnknownProtectedIdentityError",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    """What ``Registry.gc`` removed."""

    blobs_removed: int = 0
    bytes_removed: int = 0
    temp_bytes_removed: int = 0
    #: unreferenced blobs younger than the grace period (a writer may be about to reference them)
    blobs_kept_recent: int = 0


class Registry:
    """Characters, cached conditioning and the protected gallery over one database and blob store.

    Thread-safe: every store call opens its own session. Open the registry of this process's
    settings with ``Registry.open()``; close it with ``close()`` or use it as a context manager.
    """

    def __init__(self, url: str, blobs: BlobStore | str | Path, *, echo: bool = False):
        self.db = RegistryDatabase(url, blobs, echo=echo)
        self.characters = CharacterStore(self.db)
        self.conditioning = ConditioningStore(self.db)
        self.gallery = ProtectedGallery(self.db)

    @classmethod
    def open(cls, settings: Settings | None = None) -> Registry:
        """The registry of ``settings`` (default: ``get_settings()``): its database and blob store."""
        settings = settings or get_settings()
        settings.home.mkdir(parents=True, exist_ok=True)
        return cls(settings.registry_url, BlobStore.open(settings))

    def __repr__(self) -> str:
        return f"Registry({self.db.where!r}, blobs={self.blobs.location!r})"

    @property
    def blobs(self) -> BlobStore:
        return self.db.blobs

    @property
    def url(self) -> URL:
        return self.db.url

    @property
    def engine(self) -> Engine:
        return self.db.engine

    @property
    def schema_revision(self) -> str | None:
        """The database's schema revision (``imagegen.migrations.head()``)."""
        return self.db.schema_revision

    # -- maintenance across the stores -----------------------------------------------------------
    def referenced_digests(self) -> set[str]:
        """Every blob digest a row references (reference images and cached conditioning)."""
        return self.db.referenced_digests()

    def gc(self, *, grace_s: float = 3600.0) -> GcReport:
        """Delete blobs no row references, and temporary files of killed writers.

        Blobs (and temporary files) touched less than ``grace_s`` seconds ago are kept: a writer
        may have stored them and be about to commit the rows naming them. Pass ``grace_s=0`` when
        no other process is writing.
        """
        referenced = self.referenced_digests()
        cutoff = time.time() - grace_s
        candidates: set[str] = set()
        kept = 0
        for digest in list(self.blobs.digests()):
            if digest in referenced:
                continue
            try:
                if grace_s > 0 and self.blobs.mtime(digest) > cutoff:
                    kept += 1
                    continue
            except BlobNotFoundError:
                continue
            candidates.add(digest)
        # purge_unreferenced checks the rows again: a writer may have committed since we listed them
        removed, freed, _ = self.db.purge_unreferenced(candidates)
        temp = self.blobs.remove_temp_files(older_than_s=grace_s)
        logger.info("gc removed %d blobs (%d bytes), %d temp bytes", removed, freed, temp)
        return GcReport(blobs_removed=removed, bytes_removed=freed, temp_bytes_removed=temp, blobs_kept_recent=kept)

    def verify(self) -> list[str]:
        """Problems with stored bytes: referenced blobs that are missing or corrupt (empty: all good)."""
        problems = []
        for digest in sorted(self.referenced_digests()):
            try:
                self.blobs.get(digest)
            except BlobStoreError as exc:
                problems.append(str(exc))
        return problems

    def dump(self) -> dict[str, Any]:
        """Every row of every table and every file of the blob store (for before/after comparisons)."""
        tables: dict[str, list[dict[str, Any]]] = {}
        with self.db.read() as s:
            for table in Base.metadata.sorted_tables:
                rows = [{k: _plain_value(v) for k, v in row._mapping.items()} for row in s.execute(select(table))]
                tables[table.name] = sorted(rows, key=repr)
        return {"tables": tables, "blobs": self.blobs.files()}

    # -- closing ---------------------------------------------------------------------------------
    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain_value(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value
