"""The registry's tables, as SQLAlchemy 2 ORM rows (at the head revision of ``imagegen.migrations``).

::

    characters           id PK, tenant (indexed), name, card JSON, provenance_kind/creator/date/evidence,
                         status, age_check, report_passed, version, created_at, updated_at
    character_tombstones id PK, last_version, deleted_at: deleted ids, so a re-used id never
                         starts its versions again
    reference_images     id PK, character_id FK, position, blob_digest, mime_type, width, height,
                         size, filename; unique (character_id, position), (character_id, blob_digest)
    face_analyses        (reference_id FK, backend) PK, bbox, landmarks, det_score, embedding,
                         model_version, quality (JSON)
    identity_centroids   (character_id FK, backend) PK, embedding JSON, updated_at
    conditioning_cache   (character_id FK, method, method_version, weights_hash) PK, blob_digest,
                         meta JSON, character_version, created_at
    protected_identities id PK, label, backend, embedding JSON, note, created_at

Rows name bytes (reference images, cached tensors) by blob digest; the bytes live in the blob store.
The queries on these rows use no SQLite-only SQL, so any SQLAlchemy database (PostgreSQL included)
holds them. A change here needs a revision in ``imagegen/migrations/versions`` that makes the same
change (``tests/test_migrations.py`` compares the two).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Date, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from imagegen.db import UTCDateTime
from imagegen.ids import DEFAULT_TENANT

__all__ = [
    "Base",
    "CentroidRow",
    "CharacterRow",
    "ConditioningRow",
    "FaceAnalysisRow",
    "ProtectedIdentityRow",
    "ReferenceRow",
    "TombstoneRow",
]


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, date: Date, dict[str, Any]: JSON, list[Any]: JSON}


class CharacterRow(Base):
    __tablename__ = "characters"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: the owning tenant (rows written before tenancy: the default tenant, also the server default)
    tenant: Mapped[str] = mapped_column(String(64), index=True, server_default=DEFAULT_TENANT)
    name: Mapped[str] = mapped_column(String(200))
    card: Mapped[dict[str, Any]]
    provenance_kind: Mapped[str] = mapped_column(String(16))
    provenance_creator: Mapped[str] = mapped_column(String(256))
    provenance_date: Mapped[date]
    provenance_evidence: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    age_check: Mapped[str] = mapped_column(String(16))
    #: whether the last reference report passed (None: never recorded)
    report_passed: Mapped[bool | None] = mapped_column(Boolean)
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    references: Mapped[list[ReferenceRow]] = relationship(order_by="ReferenceRow.position", viewonly=True)
    centroids: Mapped[list[CentroidRow]] = relationship(viewonly=True)


class TombstoneRow(Base):
    """A deleted character id and its last version: registering the id again continues after it."""

    __tablename__ = "character_tombstones"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer)
    deleted_at: Mapped[datetime]


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
