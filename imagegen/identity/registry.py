"""The character registry: characters, reference images, face embeddings and cached conditioning.

Rows live in a SQL database through the SQLAlchemy 2 ORM (SQLite at ``IMAGEGEN_HOME/registry.db``
by default, in WAL mode with foreign keys on; any SQLAlchemy URL through ``IMAGEGEN_DATABASE_URL``,
PostgreSQL included: the queries use no SQLite-only SQL). Bytes (images, safetensors files) live in
the content-addressed ``BlobStore``; rows name them by digest.

Every change is atomic. A registration writes all blobs first, then all rows in one transaction:
a failure or a kill at any moment leaves the whole character or nothing, plus perhaps orphan
blobs, which are harmless (content addressed) and removed by ``gc()``.

Schema (version 1)::

    schema_version       version PK, applied_at
    characters           id PK, name, card JSON, provenance_kind/creator/date/evidence, status,
                         age_check, version, created_at, updated_at
    reference_images     id PK, character_id FK, position, blob_digest, mime_type, width, height,
                         size, filename; unique (character_id, position), (character_id, blob_digest)
    face_analyses        (reference_id FK, backend) PK, bbox, landmarks, det_score, embedding,
                         model_version, quality (JSON)
    identity_centroids   (character_id FK, backend) PK, embedding JSON, updated_at
    conditioning_cache   (character_id FK, method, method_version, weights_hash) PK, blob_digest,
                         meta JSON, character_version, created_at
    protected_identities id PK, label, backend, embedding JSON, note, created_at
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Date,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, NoSuchModuleError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)

from imagegen.db import SessionScopes, UTCDateTime, create_database_engine
from imagegen.db import utcnow as _utcnow
from imagegen.identity.blobstore import (
    BlobNotFoundError,
    BlobStore,
    BlobStoreError,
    CorruptBlobError,
    sha256_hex,
    validate_digest,
)
from imagegen.identity.models import (
    AGE_CHECKS,
    STATUSES,
    Card,
    Character,
    DuplicateCharacterError,
    FaceAnalysis,
    InvalidCharacterError,
    InvalidCharacterIdError,
    InvalidEmbeddingError,
    InvalidReferenceError,
    ProtectedIdentity,
    ProvenanceError,
    Reference,
    ReferenceInput,
    RegistryError,
    StaleConditioningError,
    UnknownCharacterError,
    UnknownProtectedIdentityError,
    as_embedding,
    jsonable,
    validate_character_id,
    validate_name,
)
from imagegen.settings import Settings, get_settings

if TYPE_CHECKING:
    import torch

__all__ = [
    "SCHEMA_VERSION",
    "ConditioningEntry",
    "DeleteReport",
    "DuplicateCharacterError",
    "GcReport",
    "InvalidCharacterError",
    "InvalidCharacterIdError",
    "InvalidEmbeddingError",
    "InvalidReferenceError",
    "ProvenanceError",
    "Registry",
    "RegistryError",
    "StaleConditioningError",
    "UnknownCharacterError",
    "UnknownProtectedIdentityError",
]

logger = logging.getLogger(__name__)

#: version of the schema this code writes; bump it with a migration in ``_migrate``
SCHEMA_VERSION = 1


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, date: Date, dict[str, Any]: JSON, list[Any]: JSON}


class SchemaVersionRow(Base):
    __tablename__ = "schema_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    applied_at: Mapped[datetime]


class CharacterRow(Base):
    __tablename__ = "characters"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    card: Mapped[dict[str, Any]]
    provenance_kind: Mapped[str] = mapped_column(String(16))
    provenance_creator: Mapped[str] = mapped_column(String(256))
    provenance_date: Mapped[date]
    provenance_evidence: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    age_check: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    references: Mapped[list[ReferenceRow]] = relationship(order_by="ReferenceRow.position", viewonly=True)
    centroids: Mapped[list[CentroidRow]] = relationship(viewonly=True)


class ReferenceRow(Base):
    __tablename__ = "reference_images"
    __table_args__ = (
        UniqueConstraint("character_id", "position"),
        UniqueConstraint("character_id", "blob_digest"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    character_id: Mapped[str] = mapped_column(String(64), ForeignKey("characters.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    blob_digest: Mapped[str] = mapped_column(String(64), index=True)
    mime_type: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    filename: Mapped[str] = mapped_column(String(255))

    faces: Mapped[list[FaceAnalysisRow]] = relationship(viewonly=True)


class FaceAnalysisRow(Base):
    __tablename__ = "face_analyses"

    reference_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("reference_images.id", ondelete="CASCADE"), primary_key=True
    )
    backend: Mapped[str] = mapped_column(String(64), primary_key=True)
    bbox: Mapped[list[Any]]
    landmarks: Mapped[list[Any]]
    det_score: Mapped[float] = mapped_column(Float)
    embedding: Mapped[list[Any]]
    model_version: Mapped[str] = mapped_column(String(128))
    quality: Mapped[dict[str, Any]]


class CentroidRow(Base):
    __tablename__ = "identity_centroids"

    character_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("characters.id", ondelete="CASCADE"), primary_key=True
    )
    backend: Mapped[str] = mapped_column(String(64), primary_key=True)
    embedding: Mapped[list[Any]]
    updated_at: Mapped[datetime]


class ConditioningRow(Base):
    __tablename__ = "conditioning_cache"

    character_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("characters.id", ondelete="CASCADE"), primary_key=True
    )
    method: Mapped[str] = mapped_column(String(64), primary_key=True)
    method_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    weights_hash: Mapped[str] = mapped_column(String(128), primary_key=True)
    blob_digest: Mapped[str] = mapped_column(String(64), index=True)
    meta: Mapped[dict[str, Any]]
    character_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]


class ProtectedIdentityRow(Base):
    __tablename__ = "protected_identities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    label: Mapped[str] = mapped_column(String(200))
    backend: Mapped[str] = mapped_column(String(64), index=True)
    embedding: Mapped[list[Any]]
    note: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


# -- reports ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeleteReport:
    """What ``Registry.delete`` removed."""

    character_id: str
    references: int = 0
    face_analyses: int = 0
    centroids: int = 0
    conditioning: int = 0
    blobs_removed: int = 0
    bytes_removed: int = 0
    #: blobs of this character that another character still references (kept)
    blobs_shared: int = 0


@dataclass(frozen=True)
class GcReport:
    """What ``Registry.gc`` removed."""

    blobs_removed: int = 0
    bytes_removed: int = 0
    temp_bytes_removed: int = 0
    #: unreferenced blobs younger than the grace period (a writer may be about to reference them)
    blobs_kept_recent: int = 0


@dataclass(frozen=True)
class ConditioningEntry:
    """A cached conditioning: its tensors (on CPU), metadata and where it came from."""

    character_id: str
    method: str
    method_version: str
    weights_hash: str
    digest: str
    character_version: int
    created_at: datetime
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


Hook = Callable[[], None]


# -- the registry ----------------------------------------------------------------------------------
class Registry(SessionScopes):
    """Characters and their bytes. Thread-safe: every call opens its own session.

    Open the registry of this process's settings with ``Registry.open()``; close it with
    ``close()`` or use it as a context manager.
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

    @classmethod
    def open(cls, settings: Settings | None = None) -> Registry:
        """The registry of ``settings`` (default: ``get_settings()``): its database and blob root."""
        settings = settings or get_settings()
        settings.home.mkdir(parents=True, exist_ok=True)
        return cls(settings.registry_url, BlobStore(settings.blob_root))

    def __repr__(self) -> str:
        return f"Registry({self._where!r}, blobs={str(self.blobs.root)!r})"

    @property
    def _where(self) -> str:
        return self.url.render_as_string(hide_password=True)

    # -- engine and schema -----------------------------------------------------------------------
    def _create_engine(self, *, echo: bool) -> Engine:
        # registry writes are the artists' work: fully synchronous, and deletes leave no bytes behind
        try:
            return create_database_engine(self.url, echo=echo, synchronous="FULL", secure_delete=True)
        except (ImportError, NoSuchModuleError) as exc:
            raise RegistryError(
                f"the registry database {self._where} needs a driver that is not installed ({exc}); "
                "install it (for PostgreSQL: pip install 'psycopg[binary]') or unset IMAGEGEN_DATABASE_URL "
                "to use SQLite in IMAGEGEN_HOME"
            ) from None

    def _create_schema(self) -> None:
        writer = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        with writer.begin() as conn:
            Base.metadata.create_all(conn)
            current = conn.execute(select(func.max(SchemaVersionRow.version))).scalar()
            if current is None:
                conn.execute(SchemaVersionRow.__table__.insert().values(version=SCHEMA_VERSION, applied_at=_utcnow()))
            elif current > SCHEMA_VERSION:
                raise RegistryError(
                    f"the registry at {self._where} has schema version {current}, newer than this "
                    f"imagegen understands ({SCHEMA_VERSION}); upgrade imagegen to open it"
                )
            elif current < SCHEMA_VERSION:  # pragma: no cover - no migration exists yet
                self._migrate(conn, current)

    def _migrate(self, conn: Any, current: int) -> None:  # pragma: no cover - version 1 is the first
        raise RegistryError(f"no migration from registry schema {current} to {SCHEMA_VERSION}")

    @property
    def schema_version(self) -> int:
        with self._read() as s:
            return int(s.execute(select(func.max(SchemaVersionRow.version))).scalar_one())

    def _lock_character(self, session: Session, character_id: str) -> CharacterRow:
        """The character's row, locked for update (PostgreSQL; SQLite holds the write lock)."""
        row = session.get(CharacterRow, character_id, with_for_update=True)
        if row is None:
            raise self._unknown(character_id)
        return row

    def _unknown(self, character_id: str) -> UnknownCharacterError:
        return UnknownCharacterError(
            f"no character {character_id!r} in the registry at {self._where}; check the id "
            "(Registry.list() shows the registered characters) or register the character first"
        )

    # -- reading ---------------------------------------------------------------------------------
    def _load_options(self) -> tuple[Any, ...]:
        return (
            selectinload(CharacterRow.references).selectinload(ReferenceRow.faces),
            selectinload(CharacterRow.centroids),
        )

    def get(self, character_id: str) -> Character:
        """The character ``character_id`` with its references, face analyses and centroids."""
        validate_character_id(character_id)
        with self._read() as s:
            row = s.scalars(
                select(CharacterRow).where(CharacterRow.id == character_id).options(*self._load_options())
            ).one_or_none()
            if row is None:
                raise self._unknown(character_id)
            return _character_from_row(row)

    def exists(self, character_id: str) -> bool:
        validate_character_id(character_id)
        with self._read() as s:
            return s.get(CharacterRow, character_id) is not None

    def ids(self) -> builtins.list[str]:
        """Every registered character id, sorted."""
        with self._read() as s:
            return builtins.list(s.scalars(select(CharacterRow.id).order_by(CharacterRow.id)))

    def list(self, *, status: str | None = None) -> builtins.list[Character]:
        """Every character (optionally only those with ``status``), sorted by id."""
        query = select(CharacterRow).options(*self._load_options()).order_by(CharacterRow.id)
        if status is not None:
            _check_status(status)
            query = query.where(CharacterRow.status == status)
        with self._read() as s:
            return [_character_from_row(row) for row in s.scalars(query)]

    def reference_bytes(self, character_id: str, digest: str) -> bytes:
        """The image bytes of one of ``character_id``'s references (hash-checked)."""
        validate_character_id(character_id)
        validate_digest(digest)
        with self._read() as s:
            if s.get(CharacterRow, character_id) is None:
                raise self._unknown(character_id)
            found = s.scalars(
                select(ReferenceRow.id).where(
                    ReferenceRow.character_id == character_id, ReferenceRow.blob_digest == digest
                )
            ).first()
        if found is None:
            raise InvalidReferenceError(
                f"character {character_id!r} has no reference {digest}; Registry.get(id).references "
                "lists its references"
            )
        return self.blobs.get(digest)

    # -- registering -----------------------------------------------------------------------------
    def register(
        self,
        character: Character | Mapping[str, Any],
        references: Sequence[ReferenceInput | Mapping[str, Any]] = (),
        *,
        _after_blob_written: Callable[[int], None] | None = None,
        _after_blobs_written: Hook | None = None,
        _before_commit: Hook | None = None,
        _after_commit: Hook | None = None,
    ) -> Character:
        """Register a new character with its reference images; returns it as stored.

        The character is stored with ``version=1`` and fresh timestamps; its ``status``,
        ``age_check`` and ``centroids`` are stored as given. All blobs are written first, then
        every row in one transaction: the registry holds the whole character or nothing.
        The ``_after_*`` / ``_before_commit`` hooks exist for crash tests.
        """
        char = _coerce_character(character)
        if char.references:
            raise InvalidCharacterError(
                "Character.references is filled by the registry; pass the images as "
                "register(character, references=[ReferenceInput(data=..., faces=...), ...])",
                field="references",
            )
        refs = _coerce_references(references)
        if self.exists(char.id):
            raise self._duplicate(char.id)

        payloads: dict[str, bytes] = {}
        for index, ref in enumerate(refs):
            payloads[self.blobs.put(ref.data)] = ref.data
            if _after_blob_written is not None:
                _after_blob_written(index)
        if _after_blobs_written is not None:
            _after_blobs_written()

        now = _utcnow()
        try:
            with self._write() as s:
                s.add(_character_row(char, now))
                s.flush()  # the character row first: its id is the foreign key of the rest
                _add_reference_rows(s, char.id, refs, start=0)
                for backend, embedding in char.centroids.items():
                    s.add(CentroidRow(character_id=char.id, backend=backend, embedding=embedding, updated_at=now))
                s.flush()
                if _before_commit is not None:
                    _before_commit()
        except IntegrityError:
            if self.exists(char.id):
                raise self._duplicate(char.id) from None
            raise
        self._ensure_blobs(payloads)
        if _after_commit is not None:
            _after_commit()
        logger.info("registered character %s with %d references", char.id, len(refs))
        return self.get(char.id)

    def _duplicate(self, character_id: str) -> DuplicateCharacterError:
        return DuplicateCharacterError(
            f"a character with id {character_id!r} is already registered; pick another id, or "
            "change the existing one (replace_references, update_card) or delete it first"
        )

    def _ensure_blobs(self, payloads: Mapping[str, bytes]) -> None:
        """After a commit, put back any blob a concurrent delete/gc removed in the meantime."""
        for digest, data in payloads.items():
            if not self.blobs.exists(digest):
                logger.warning("blob %s vanished during a commit (concurrent gc?); storing it again", digest)
                self.blobs.put(data)

    # -- changing a character --------------------------------------------------------------------
    def set_status(self, character_id: str, status: str) -> Character:
        """Store a new status; the version bumps when it changes. The checks live in safeguards."""
        validate_character_id(character_id)
        _check_status(status)
        with self._write() as s:
            row = self._lock_character(s, character_id)
            if row.status != status:
                row.status = status
                _bump(row)
        return self.get(character_id)

    def approve(self, character_id: str) -> Character:
        """``set_status(character_id, 'approved')`` (run the safeguards first)."""
        return self.set_status(character_id, "approved")

    def set_age_check(self, character_id: str, age_check: str) -> Character:
        """Store the apparent-age gate's result (``passed`` | ``unverified`` | ``failed``)."""
        validate_character_id(character_id)
        if age_check not in AGE_CHECKS:
            raise InvalidCharacterError(
                f"age_check {age_check!r} is not one of {', '.join(AGE_CHECKS)}", field="age_check"
            )
        with self._write() as s:
            row = self._lock_character(s, character_id)
            if row.age_check != age_check:
                row.age_check = age_check
                row.updated_at = _utcnow()
        return self.get(character_id)

    def update_card(
        self, character_id: str, card: Card | Mapping[str, Any] | None = None, *, name: str | None = None
    ) -> Character:
        """Replace the card and/or the name; the version bumps when either changes."""
        validate_character_id(character_id)
        new_card = None if card is None else (card if isinstance(card, Card) else Card.model_validate(card))
        if name is not None:
            name = name.strip()
            if not name or len(name) > 200:
                raise InvalidCharacterError("a character name has 1 to 200 characters", field="name")
        with self._write() as s:
            row = self._lock_character(s, character_id)
            changed = False
            if new_card is not None and new_card.model_dump(mode="json") != row.card:
                row.card = new_card.model_dump(mode="json")
                changed = True
            if name is not None and name != row.name:
                row.name = name
                changed = True
            if changed:
                _bump(row)
        return self.get(character_id)

    def replace_references(
        self, character_id: str, references: Sequence[ReferenceInput | Mapping[str, Any]]
    ) -> Character:
        """Replace the whole reference set.

        Bumps the version, deletes the character's cached conditioning and its centroids (they
        described the old set; the references module recomputes them) and removes blobs nobody
        references any more. Recomputes nothing itself.
        """
        return self._change_references(character_id, _coerce_references(references), mode="replace")

    def add_references(self, character_id: str, references: Sequence[ReferenceInput | Mapping[str, Any]]) -> Character:
        """Append references (same invalidation as ``replace_references``)."""
        return self._change_references(character_id, _coerce_references(references), mode="add")

    def remove_references(self, character_id: str, digests: Iterable[str]) -> Character:
        """Remove the references with these digests (same invalidation as ``replace_references``)."""
        remove = [validate_digest(d) for d in digests]
        return self._change_references(character_id, [], mode="remove", remove=remove)

    def _change_references(
        self,
        character_id: str,
        refs: builtins.list[ReferenceInput],
        *,
        mode: str,
        remove: Sequence[str] = (),
    ) -> Character:
        validate_character_id(character_id)
        if not self.exists(character_id):
            raise self._unknown(character_id)
        payloads = {self.blobs.put(ref.data): ref.data for ref in refs}
        with self._write() as s:
            row = self._lock_character(s, character_id)
            existing = builtins.list(
                s.scalars(
                    select(ReferenceRow)
                    .where(ReferenceRow.character_id == character_id)
                    .order_by(ReferenceRow.position)
                )
            )
            old_digests = {r.blob_digest for r in existing}
            if mode == "remove":
                missing = sorted(set(remove) - old_digests)
                if missing:
                    raise InvalidReferenceError(
                        f"character {character_id!r} has no reference {missing[0]}; "
                        "Registry.get(id).references lists its references"
                    )
                doomed = [r.id for r in existing if r.blob_digest in set(remove)]
                start = 0
            elif mode == "add":
                for ref in refs:
                    digest = sha256_hex(ref.data)
                    if digest in old_digests:
                        raise InvalidReferenceError(
                            f"{ref.filename or 'a reference'} is already one of {character_id!r}'s "
                            "references (same bytes); leave it out"
                        )
                doomed = []
                start = max((r.position for r in existing), default=-1) + 1
            else:
                doomed = [r.id for r in existing]
                start = 0
            if doomed:
                s.execute(delete(FaceAnalysisRow).where(FaceAnalysisRow.reference_id.in_(doomed)))
                s.execute(delete(ReferenceRow).where(ReferenceRow.id.in_(doomed)))
                s.flush()
            _add_reference_rows(s, character_id, refs, start=start)
            candidates = old_digests | self._drop_derived(s, character_id)
            _bump(row)
        self._ensure_blobs(payloads)
        self._purge_unreferenced(candidates)
        return self.get(character_id)

    def _drop_derived(self, s: Session, character_id: str) -> set[str]:
        """Delete the cached conditioning and centroids of a character; returns the cache's blobs."""
        digests = set(
            s.scalars(select(ConditioningRow.blob_digest).where(ConditioningRow.character_id == character_id))
        )
        s.execute(delete(ConditioningRow).where(ConditioningRow.character_id == character_id))
        s.execute(delete(CentroidRow).where(CentroidRow.character_id == character_id))
        return digests

    def set_centroid(self, character_id: str, backend: str, embedding: Any) -> None:
        """Store the identity centroid of ``character_id`` for face backend ``backend``."""
        validate_character_id(character_id)
        validate_name(backend, "face backend name")
        vector = as_embedding(embedding, f"centroid of {backend!r}")
        now = _utcnow()
        with self._write() as s:
            self._lock_character(s, character_id)
            row = s.get(CentroidRow, (character_id, backend))
            if row is None:
                s.add(CentroidRow(character_id=character_id, backend=backend, embedding=vector, updated_at=now))
            else:
                row.embedding = vector
                row.updated_at = now

    # -- deleting --------------------------------------------------------------------------------
    def delete(self, character_id: str) -> DeleteReport:
        """Remove every byte of a character: rows, reference images, embeddings, cached tensors.

        Blobs that another character still references are kept (and counted as shared). If the
        process dies after the rows are gone but before the files are, ``gc()`` removes them.
        """
        validate_character_id(character_id)
        with self._write() as s:
            self._lock_character(s, character_id)
            ref_ids = builtins.list(s.scalars(select(ReferenceRow.id).where(ReferenceRow.character_id == character_id)))
            candidates = set(
                s.scalars(select(ReferenceRow.blob_digest).where(ReferenceRow.character_id == character_id))
            )
            candidates |= set(
                s.scalars(select(ConditioningRow.blob_digest).where(ConditioningRow.character_id == character_id))
            )
            faces = conditioning = centroids = 0
            if ref_ids:
                faces = s.execute(delete(FaceAnalysisRow).where(FaceAnalysisRow.reference_id.in_(ref_ids))).rowcount
            references = s.execute(delete(ReferenceRow).where(ReferenceRow.character_id == character_id)).rowcount
            conditioning = s.execute(
                delete(ConditioningRow).where(ConditioningRow.character_id == character_id)
            ).rowcount
            centroids = s.execute(delete(CentroidRow).where(CentroidRow.character_id == character_id)).rowcount
            s.execute(delete(CharacterRow).where(CharacterRow.id == character_id))
        removed, freed, shared = self._purge_unreferenced(candidates)
        self._checkpoint()
        logger.info("deleted character %s (%d blobs, %d bytes)", character_id, removed, freed)
        return DeleteReport(
            character_id=character_id,
            references=references,
            face_analyses=faces,
            centroids=centroids,
            conditioning=conditioning,
            blobs_removed=removed,
            bytes_removed=freed,
            blobs_shared=shared,
        )

    def _checkpoint(self) -> None:
        """SQLite: copy the WAL into the database and truncate it, so deleted rows leave no trace.

        Best effort: a reader in another process can keep the WAL busy; the next checkpoint
        then finishes the job (``secure_delete`` already zeroed the freed pages).
        """
        if self.url.get_backend_name() != "sqlite":
            return
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                cursor.close()
        except Exception as exc:  # noqa: BLE001 - best effort, never fails a completed delete
            logger.debug("WAL checkpoint after delete failed: %s", exc)
        finally:
            raw.close()

    def referenced_digests(self) -> set[str]:
        """Every blob digest a row references (reference images and cached conditioning)."""
        with self._read() as s:
            return set(s.scalars(select(ReferenceRow.blob_digest))) | set(
                s.scalars(select(ConditioningRow.blob_digest))
            )

    def _purge_unreferenced(self, candidates: Iterable[str]) -> tuple[int, int, int]:
        """Delete the candidate blobs no row references; returns (removed, bytes, still referenced)."""
        candidates = set(candidates)
        if not candidates:
            return 0, 0, 0
        with self._read() as s:
            still = set(
                s.scalars(select(ReferenceRow.blob_digest).where(ReferenceRow.blob_digest.in_(candidates)))
            ) | set(s.scalars(select(ConditioningRow.blob_digest).where(ConditioningRow.blob_digest.in_(candidates))))
        removed = freed = 0
        for digest in sorted(candidates - still):
            if self.blobs.exists(digest):
                freed += self.blobs.delete(digest)
                removed += 1
        return removed, freed, len(still)

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
        for digest in builtins.list(self.blobs.digests()):
            if digest in referenced:
                continue
            try:
                if grace_s > 0 and self.blobs.mtime(digest) > cutoff:
                    kept += 1
                    continue
            except BlobNotFoundError:
                continue
            candidates.add(digest)
        # _purge_unreferenced checks the rows again: a writer may have committed since we listed them
        removed, freed, _ = self._purge_unreferenced(candidates)
        temp = self.blobs.remove_temp_files(older_than_s=grace_s)
        logger.info("gc removed %d blobs (%d bytes), %d temp bytes", removed, freed, temp)
        return GcReport(blobs_removed=removed, bytes_removed=freed, temp_bytes_removed=temp, blobs_kept_recent=kept)

    def verify(self) -> builtins.list[str]:
        """Problems with stored bytes: referenced blobs that are missing or corrupt (empty: all good)."""
        problems = []
        for digest in sorted(self.referenced_digests()):
            try:
                self.blobs.get(digest)
            except BlobStoreError as exc:
                problems.append(str(exc))
        return problems

    # -- cached conditioning ---------------------------------------------------------------------
    def put_conditioning(
        self,
        character_id: str,
        method: str,
        method_version: str,
        weights_hash: str,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any] | None = None,
        *,
        expected_version: int | None = None,
    ) -> str:
        """Cache the conditioning tensors of a character for one method; returns the blob digest.

        ``expected_version`` is the character version the tensors were computed from: when the
        character changed since, ``StaleConditioningError`` is raised and nothing is stored.
        """
        from safetensors.torch import save

        validate_character_id(character_id)
        key = _conditioning_key(method, method_version, weights_hash)
        meta_json = jsonable(dict(meta or {}), "conditioning meta")
        if not tensors:
            raise InvalidCharacterError("conditioning needs at least one tensor", field="tensors")
        if any(not isinstance(name, str) or not name for name in tensors):
            raise InvalidCharacterError("conditioning tensor names must be non-empty strings", field="tensors")
        data = save({name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()})
        digest = self.blobs.put(data)
        now = _utcnow()
        try:
            with self._write() as s:
                row = self._lock_character(s, character_id)
                if expected_version is not None and row.version != expected_version:
                    raise StaleConditioningError(
                        f"character {character_id!r} is at version {row.version}, the conditioning was "
                        f"computed from version {expected_version}; compute it again from the current "
                        "references"
                    )
                old = s.get(ConditioningRow, (character_id, *key))
                replaced = None
                if old is None:
                    s.add(
                        ConditioningRow(
                            character_id=character_id,
                            method=key[0],
                            method_version=key[1],
                            weights_hash=key[2],
                            blob_digest=digest,
                            meta=meta_json,
                            character_version=row.version,
                            created_at=now,
                        )
                    )
                else:
                    replaced = old.blob_digest
                    old.blob_digest, old.meta = digest, meta_json
                    old.character_version, old.created_at = row.version, now
        except RegistryError:
            self._purge_unreferenced({digest})
            raise
        self._ensure_blobs({digest: data})
        if replaced is not None and replaced != digest:
            self._purge_unreferenced({replaced})
        return digest

    def get_conditioning_entry(
        self, character_id: str, method: str, method_version: str, weights_hash: str
    ) -> ConditioningEntry | None:
        """The cached conditioning with its metadata, or None on a miss.

        A missing or corrupt cache blob is logged and reported as a miss (compute and put again).
        """
        from safetensors.torch import load

        validate_character_id(character_id)
        key = _conditioning_key(method, method_version, weights_hash)
        with self._read() as s:
            if s.get(CharacterRow, character_id) is None:
                raise self._unknown(character_id)
            row = s.get(ConditioningRow, (character_id, *key))
            if row is None:
                return None
            entry = ConditioningEntry(
                character_id=character_id,
                method=key[0],
                method_version=key[1],
                weights_hash=key[2],
                digest=row.blob_digest,
                character_version=row.character_version,
                created_at=row.created_at,
                meta=dict(row.meta or {}),
            )
        try:
            data = self.blobs.get(entry.digest)
        except (BlobNotFoundError, CorruptBlobError) as exc:
            logger.warning("conditioning cache of %s/%s unreadable (%s); treating as a miss", character_id, method, exc)
            return None
        return dataclasses.replace(entry, tensors=load(data))

    def get_conditioning(
        self, character_id: str, method: str, method_version: str, weights_hash: str
    ) -> dict[str, torch.Tensor] | None:
        """The cached conditioning tensors (on CPU), or None on a miss."""
        entry = self.get_conditioning_entry(character_id, method, method_version, weights_hash)
        return None if entry is None else entry.tensors

    def invalidate_conditioning(self, character_id: str, method: str | None = None) -> int:
        """Delete a character's cached conditioning (all methods, or one); returns the rows deleted."""
        validate_character_id(character_id)
        with self._write() as s:
            self._lock_character(s, character_id)
            query = select(ConditioningRow).where(ConditioningRow.character_id == character_id)
            if method is not None:
                query = query.where(ConditioningRow.method == method)
            rows = builtins.list(s.scalars(query))
            for row in rows:
                s.delete(row)
            digests = {row.blob_digest for row in rows}
        self._purge_unreferenced(digests)
        return len(rows)

    # -- protected identities --------------------------------------------------------------------
    def add_protected_identity(self, label: str, backend: str, embedding: Any, note: str = "") -> ProtectedIdentity:
        """Add an embedding (never an image) to the protected-identity gallery."""
        label = (label or "").strip()
        if not label or len(label) > 200:
            raise InvalidCharacterError(
                "a protected identity needs a label of 1 to 200 characters (who it protects)", field="label"
            )
        validate_name(backend, "face backend name")
        vector = as_embedding(embedding, "protected identity embedding")
        with self._write() as s:
            row = ProtectedIdentityRow(
                label=label, backend=backend, embedding=vector, note=note or "", created_at=_utcnow()
            )
            s.add(row)
            s.flush()
            return _protected_from_row(row)

    def list_protected_identities(self, backend: str | None = None) -> builtins.list[ProtectedIdentity]:
        query = select(ProtectedIdentityRow).order_by(ProtectedIdentityRow.id)
        if backend is not None:
            query = query.where(ProtectedIdentityRow.backend == backend)
        with self._read() as s:
            return [_protected_from_row(row) for row in s.scalars(query)]

    def remove_protected_identity(self, identity_id: int) -> None:
        with self._write() as s:
            row = s.get(ProtectedIdentityRow, int(identity_id))
            if row is None:
                raise UnknownProtectedIdentityError(
                    f"no protected identity with id {identity_id}; list_protected_identities() shows them"
                )
            s.delete(row)

    # -- inspection ------------------------------------------------------------------------------
    def dump(self) -> dict[str, Any]:
        """Every row of every table and every file of the blob store (for before/after comparisons)."""
        tables: dict[str, builtins.list[dict[str, Any]]] = {}
        with self._read() as s:
            for table in Base.metadata.sorted_tables:
                rows = [{k: _plain_value(v) for k, v in row._mapping.items()} for row in s.execute(select(table))]
                tables[table.name] = sorted(rows, key=repr)
        return {"tables": tables, "blobs": self.blobs.files()}


# -- conversions -----------------------------------------------------------------------------------
def _plain_value(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise InvalidCharacterError(f"status {status!r} is not one of {', '.join(STATUSES)}", field="status")


def _bump(row: CharacterRow) -> None:
    row.version = row.version + 1
    row.updated_at = _utcnow()


def _conditioning_key(method: str, method_version: str, weights_hash: str) -> tuple[str, str, str]:
    validate_name(method, "conditioning method")
    validate_name(method_version, "method version")
    if not isinstance(weights_hash, str) or not 1 <= len(weights_hash) <= 128 or not weights_hash.isprintable():
        raise InvalidCharacterError(
            f"weights_hash {weights_hash!r} must be 1 to 128 printable characters (e.g. a sha256)",
            field="weights_hash",
        )
    return method, method_version, weights_hash


def _coerce_character(character: Character | Mapping[str, Any]) -> Character:
    if isinstance(character, Character):
        return Character.model_validate(character.model_dump())
    if isinstance(character, Mapping):
        return Character.model_validate(dict(character))
    raise InvalidCharacterError(f"expected a Character, got a {type(character).__name__}")


def _coerce_references(references: Sequence[ReferenceInput | Mapping[str, Any]]) -> builtins.list[ReferenceInput]:
    if isinstance(references, bytes | str | Mapping):
        raise InvalidReferenceError("references must be a list of ReferenceInput (one per image)")
    refs = [r if isinstance(r, ReferenceInput) else ReferenceInput.model_validate(r) for r in references]
    seen: dict[str, int] = {}
    for index, ref in enumerate(refs):
        digest = sha256_hex(ref.data)
        if digest in seen:
            raise InvalidReferenceError(
                f"reference {index} ({ref.filename or 'no filename'}) has the same bytes as reference "
                f"{seen[digest]}; remove the duplicate"
            )
        seen[digest] = index
    return refs


def _character_row(char: Character, now: datetime) -> CharacterRow:
    return CharacterRow(
        id=char.id,
        name=char.name,
        card=char.card.model_dump(mode="json"),
        provenance_kind=char.provenance.kind,
        provenance_creator=char.provenance.creator,
        provenance_date=char.provenance.date,
        provenance_evidence=char.provenance.evidence,
        status=char.status,
        age_check=char.age_check,
        version=1,
        created_at=now,
        updated_at=now,
    )


def _add_reference_rows(s: Session, character_id: str, refs: Sequence[ReferenceInput], *, start: int) -> None:
    ref_rows = []
    for offset, ref in enumerate(refs):
        row = ReferenceRow(
            character_id=character_id,
            position=start + offset,
            blob_digest=sha256_hex(ref.data),
            mime_type=ref.mime_type,
            width=ref.width,
            height=ref.height,
            size=len(ref.data),
            filename=ref.filename,
        )
        s.add(row)
        ref_rows.append(row)
    s.flush()  # assigns the reference ids
    for row, ref in zip(ref_rows, refs, strict=True):
        for backend, face in ref.faces.items():
            s.add(_face_row(row.id, backend, face))


def _face_row(reference_id: int, backend: str, face: FaceAnalysis) -> FaceAnalysisRow:
    return FaceAnalysisRow(
        reference_id=reference_id,
        backend=backend,
        bbox=face.bbox,
        landmarks=face.landmarks,
        det_score=face.det_score,
        embedding=face.embedding,
        model_version=face.model_version,
        quality=face.quality,
    )


def _character_from_row(row: CharacterRow) -> Character:
    return Character.model_validate(
        {
            "id": row.id,
            "name": row.name,
            "card": row.card,
            "provenance": {
                "kind": row.provenance_kind,
                "creator": row.provenance_creator,
                "date": row.provenance_date,
                "evidence": row.provenance_evidence,
            },
            "status": row.status,
            "version": row.version,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "age_check": row.age_check,
            "references": [
                Reference(
                    digest=ref.blob_digest,
                    mime_type=ref.mime_type,
                    width=ref.width,
                    height=ref.height,
                    size=ref.size,
                    filename=ref.filename,
                    faces={
                        face.backend: {
                            "bbox": face.bbox,
                            "landmarks": face.landmarks,
                            "det_score": face.det_score,
                            "embedding": face.embedding,
                            "model_version": face.model_version,
                            "quality": face.quality,
                        }
                        for face in sorted(ref.faces, key=lambda f: f.backend)
                    },
                )
                for ref in row.references
            ],
            "centroids": {c.backend: c.embedding for c in sorted(row.centroids, key=lambda c: c.backend)},
        }
    )


def _protected_from_row(row: ProtectedIdentityRow) -> ProtectedIdentity:
    return ProtectedIdentity(
        id=row.id,
        label=row.label,
        backend=row.backend,
        embedding=row.embedding,
        note=row.note,
        created_at=row.created_at,
    )
