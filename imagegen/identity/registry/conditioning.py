"""The conditioning store: identity tensors cached per character, method, method version and weights.

A cached conditioning is one safetensors blob plus a row naming it. It belongs to the character
version it was computed from (``put(..., expected_version=...)`` refuses a stale one); changing a
character's references or deleting the character drops its cache (``CharacterStore``). A missing
or corrupt blob reads as a miss: compute and put again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from imagegen.blobstore import BlobNotFoundError, CorruptBlobError
from imagegen.db import utcnow as _utcnow
from imagegen.identity.models import (
    InvalidCharacterError,
    RegistryError,
    StaleConditioningError,
    jsonable,
    validate_character_id,
    validate_name,
)
from imagegen.identity.registry.database import RegistryDatabase
from imagegen.identity.registry.schema import CharacterRow, ConditioningRow

if TYPE_CHECKING:
    import torch

__all__ = ["ConditioningEntry", "ConditioningStore"]

logger = logging.getLogger(__name__)


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


class ConditioningStore:
    """Cached conditioning tensors (``registry.conditioning``)."""

    def __init__(self, db: RegistryDatabase):
        self.db = db

    def __repr__(self) -> str:
        return f"ConditioningStore({self.db.where!r})"

    def put(
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
        digest = self.db.blobs.put(data)
        now = _utcnow()
        try:
            with self.db.write() as s:
                row = self.db.lock_character(s, character_id)
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
            self.db.purge_unreferenced({digest})
            raise
        self.db.ensure_blobs({digest: data})
        if replaced is not None and replaced != digest:
            self.db.purge_unreferenced({replaced})
        return digest

    def get_entry(
        self, character_id: str, method: str, method_version: str, weights_hash: str
    ) -> ConditioningEntry | None:
        """The cached conditioning with its metadata, or None on a miss.

        A missing or corrupt cache blob is logged and reported as a miss (compute and put again).
        """
        from safetensors.torch import load

        validate_character_id(character_id)
        key = _conditioning_key(method, method_version, weights_hash)
        with self.db.read() as s:
            if s.get(CharacterRow, character_id) is None:
                raise self.db.unknown_character(character_id)
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
            data = self.db.blobs.get(entry.digest)
        except (BlobNotFoundError, CorruptBlobError) as exc:
            logger.warning("conditioning cache of %s/%s unreadable (%s); treating as a miss", character_id, method, exc)
            return None
        return dataclasses.replace(entry, tensors=load(data))

    def get(
        self, character_id: str, method: str, method_version: str, weights_hash: str
    ) -> dict[str, torch.Tensor] | None:
        """The cached conditioning tensors (on CPU), or None on a miss."""
        entry = self.get_entry(character_id, method, method_version, weights_hash)
        return None if entry is None else entry.tensors

    def invalidate(self, character_id: str, method: str | None = None) -> int:
        """Delete a character's cached conditioning (all methods, or one); returns the rows deleted."""
        validate_character_id(character_id)
        with self.db.write() as s:
            self.db.lock_character(s, character_id)
            query = select(ConditioningRow).where(ConditioningRow.character_id == character_id)
            if method is not None:
                query = query.where(ConditioningRow.method == method)
            rows = list(s.scalars(query))
            for row in rows:
                s.delete(row)
            digests = {row.blob_digest for row in rows}
        self.db.purge_unreferenced(digests)
        return len(rows)


def _conditioning_key(method: str, method_version: str, weights_hash: str) -> tuple[str, str, str]:
    validate_name(method, "conditioning method")
    validate_name(method_version, "method version")
    if not isinstance(weights_hash, str) or not 1 <= len(weights_hash) <= 128 or not weights_hash.isprintable():
        raise InvalidCharacterError(
            f"weights_hash {weights_hash!r} must be 1 to 128 printable characters (e.g. a sha256)",
            field="weights_hash",
        )
    return method, method_version, weights_hash
