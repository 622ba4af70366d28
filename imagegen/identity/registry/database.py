"""The registry's database: one engine, the schema revision check, the blob store, and transactions.

Every store of the registry (characters, cached conditioning, the protected gallery) shares one
``RegistryDatabase``: one engine, one blob store. It also owns the rule every store follows for
bytes: a blob is kept while a row (a reference image or a cached conditioning) names it.

Rows live in a SQL database through the SQLAlchemy 2 ORM (SQLite at ``IMAGEGEN_HOME/registry.db``
by default, in WAL mode with foreign keys on; any SQLAlchemy URL through ``IMAGEGEN_DATABASE_URL``,
PostgreSQL included). Bytes (images, safetensors files) live in the content-addressed ``BlobStore``.
The schema is versioned by ``imagegen.migrations`` (Alembic): opening creates a fresh database at
head and refuses an older one (``imagegen db upgrade``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import NoSuchModuleError
from sqlalchemy.orm import Session

from imagegen.blobstore import BlobStore
from imagegen.db import SessionScopes, checkpoint_wal, create_database_engine
from imagegen.identity.models import RegistryError, UnknownCharacterError
from imagegen.identity.registry.schema import Base, CharacterRow, ConditioningRow, ReferenceRow
from imagegen.migrations import prepare, read_state, where_of

__all__ = ["RegistryDatabase"]

logger = logging.getLogger(__name__)


class RegistryDatabase(SessionScopes):
    """The engine, schema and blob store the registry's stores share. Thread-safe.

    ``read()`` and ``write()`` open one transaction each (a write takes SQLite's write lock up
    front); every store call opens its own.
    """

    def __init__(self, url: str, blobs: BlobStore | str | Path, *, echo: bool = False):
        self.blobs = blobs if isinstance(blobs, BlobStore) else BlobStore(blobs)
        self.url = make_url(url)
        self.engine = self._create_engine(echo=echo)
        try:
            self._create_schema()
        except BaseException:
            self.engine.dispose()
            raise
        self._open_sessions()

    def __repr__(self) -> str:
        return f"RegistryDatabase({self.where!r}, blobs={self.blobs.location!r})"

    @property
    def where(self) -> str:
        """The database URL with its password hidden: for operator messages (startup, CLI), never
        for errors a request can trigger (an HTTP client must not learn where the database is)."""
        return where_of(self.url)

    # -- engine and schema -----------------------------------------------------------------------
    def _create_engine(self, *, echo: bool) -> Engine:
        # registry writes are the artists' work: fully synchronous, and deletes leave no bytes behind
        try:
            return create_database_engine(self.url, echo=echo, synchronous="FULL", secure_delete=True)
        except (ImportError, NoSuchModuleError) as exc:
            raise RegistryError(
                f"the registry database {self.where} needs a driver that is not installed ({exc}); "
                "install it (for PostgreSQL: pip install 'psycopg[binary]') or unset IMAGEGEN_DATABASE_URL "
                "to use SQLite in IMAGEGEN_HOME"
            ) from None

    def _create_schema(self) -> None:
        """A fresh database is created at head; an older or newer schema is refused (``SchemaError``)."""
        prepare(self.engine, Base.metadata, self.where)

    @property
    def schema_revision(self) -> str | None:
        """The database's Alembic revision (``imagegen.migrations.head()`` once opened)."""
        with self.engine.connect() as conn:
            return read_state(conn).revision

    # -- transactions ----------------------------------------------------------------------------
    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read transaction (a deferred ``BEGIN`` on SQLite: never blocks writers)."""
        with self._read() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction, committed on exit (``BEGIN IMMEDIATE`` on SQLite)."""
        with self._write() as session:
            yield session

    def lock_character(self, session: Session, character_id: str) -> CharacterRow:
        """The character's row, locked for update (PostgreSQL; SQLite holds the write lock)."""
        row = session.get(CharacterRow, character_id, with_for_update=True)
        if row is None:
            raise self.unknown_character(character_id)
        return row

    def unknown_character(self, character_id: str) -> UnknownCharacterError:
        # no database path: HTTP clients see this message
        return UnknownCharacterError(
            f"no character {character_id!r} in the registry; check the id "
            "(registry.characters.all() shows the registered characters) or register the character first"
        )

    # -- blobs the rows name ---------------------------------------------------------------------
    def referenced_digests(self) -> set[str]:
        """Every blob digest a row references (reference images and cached conditioning)."""
        with self.read() as s:
            return set(s.scalars(select(ReferenceRow.blob_digest))) | set(
                s.scalars(select(ConditioningRow.blob_digest))
            )

    def purge_unreferenced(self, candidates: Iterable[str]) -> tuple[int, int, int]:
        """Delete the candidate blobs no row references; returns (removed, bytes, still referenced)."""
        candidates = set(candidates)
        if not candidates:
            return 0, 0, 0
        with self.read() as s:
            still = set(
                s.scalars(select(ReferenceRow.blob_digest).where(ReferenceRow.blob_digest.in_(candidates)))
            ) | set(s.scalars(select(ConditioningRow.blob_digest).where(ConditioningRow.blob_digest.in_(candidates))))
        removed = freed = 0
        for digest in sorted(candidates - still):
            if self.blobs.exists(digest):
                freed += self.blobs.delete(digest)
                removed += 1
        return removed, freed, len(still)

    def ensure_blobs(self, payloads: Mapping[str, bytes]) -> None:
        """After a commit, put back any blob a concurrent delete/gc removed in the meantime."""
        for digest, data in payloads.items():
            if not self.blobs.exists(digest):
                logger.warning("blob %s vanished during a commit (concurrent gc?); storing it again", digest)
                self.blobs.put(data)

    def checkpoint(self) -> None:
        """SQLite: fold the WAL into the database file and truncate it (``imagegen.db.checkpoint_wal``)."""
        checkpoint_wal(self.engine)
