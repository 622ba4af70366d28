"""The protected-identity gallery: face embeddings (never images) of people no character may resemble.

The safeguards compare every new character's faces against it (``imagegen.identity.safeguards``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from imagegen.db import utcnow as _utcnow
from imagegen.identity.models import (
    InvalidCharacterError,
    ProtectedIdentity,
    UnknownProtectedIdentityError,
    as_embedding,
    validate_name,
)
from imagegen.identity.registry.database import RegistryDatabase
from imagegen.identity.registry.schema import ProtectedIdentityRow

__all__ = ["ProtectedGallery"]


class ProtectedGallery:
    """Protected identities (``registry.gallery``)."""

    def __init__(self, db: RegistryDatabase):
        self.db = db

    def __repr__(self) -> str:
        return f"ProtectedGallery({self.db.where!r})"

    def add(self, label: str, backend: str, embedding: Any, note: str = "") -> ProtectedIdentity:
        """Add an embedding (never an image) to the gallery."""
        label = (label or "").strip()
        if not label or len(label) > 200:
            raise InvalidCharacterError(
                "a protected identity needs a label of 1 to 200 characters (who it protects)", field="label"
            )
        validate_name(backend, "face backend name")
        vector = as_embedding(embedding, "protected identity embedding")
        with self.db.write() as s:
            row = ProtectedIdentityRow(
                label=label, backend=backend, embedding=vector, note=note or "", created_at=_utcnow()
            )
            s.add(row)
            s.flush()
            return _protected_from_row(row)

    def all(self, backend: str | None = None) -> list[ProtectedIdentity]:
        """Every protected identity (optionally only those of face backend ``backend``), oldest first."""
        query = select(ProtectedIdentityRow).order_by(ProtectedIdentityRow.id)
        if backend is not None:
            query = query.where(ProtectedIdentityRow.backend == backend)
        with self.db.read() as s:
            return [_protected_from_row(row) for row in s.scalars(query)]

    def remove(self, identity_id: int) -> None:
        with self.db.write() as s:
            row = s.get(ProtectedIdentityRow, int(identity_id))
            if row is None:
                raise UnknownProtectedIdentityError(
                    f"no protected identity with id {identity_id}; `imagegen protect list` (registry.gallery.all()) "
                    "shows them"
                )
            s.delete(row)


def _protected_from_row(row: ProtectedIdentityRow) -> ProtectedIdentity:
    return ProtectedIdentity(
        id=row.id,
        label=row.label,
        backend=row.backend,
        embedding=row.embedding,
        note=row.note,
        created_at=row.created_at,
    )
