"""The character store: characters, their reference images, face analyses and identity centroids.

Every change is atomic. A registration writes all blobs first, then all rows in one transaction:
a failure or a kill at any moment leaves the whole character or nothing, plus perhaps orphan
blobs, which are harmless (content addressed) and removed by ``Registry.gc()``.

A character's cached conditioning is derived from its references: changing the references or
deleting the character removes it in the same transaction (the conditioning store only caches).

Versions never restart: deleting a character leaves a tombstone (its id and last version), and
registering the id again continues after it. Caches keyed by (id, version) — the renderers' —
therefore never hand out a deleted face for a new character that re-uses the id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from imagegen.blobstore import BlobNotFoundError, CorruptBlobError, sha256_hex, validate_digest
from imagegen.db import utcnow as _utcnow
from imagegen.identity.models import (
    AGE_CHECKS,
    STATUSES,
    Card,
    Character,
    DuplicateCharacterError,
    FaceAnalysis,
    InvalidCharacterError,
    InvalidReferenceError,
    Reference,
    ReferenceInput,
    as_embedding,
    validate_character_id,
    validate_name,
)
from imagegen.identity.registry.database import RegistryDatabase
from imagegen.identity.registry.schema import (
    CentroidRow,
    CharacterRow,
    ConditioningRow,
    FaceAnalysisRow,
    ReferenceRow,
    TombstoneRow,
)
from imagegen.ids import validate_new_character_id, validate_tenant_id

__all__ = ["CharacterStore", "DeleteReport"]

logger = logging.getLogger(__name__)

Hook = Callable[[], None]


@dataclass(frozen=True)
class DeleteReport:
    """What ``CharacterStore.delete`` removed."""

    character_id: str
    references: int = 0
    face_analyses: int = 0
    centroids: int = 0
    conditioning: int = 0
    blobs_removed: int = 0
    bytes_removed: int = 0
    #: blobs of this character that another character still references (kept)
    blobs_shared: int = 0


class CharacterStore:
    """Characters with their references, face analyses and centroids (``registry.characters``)."""

    def __init__(self, db: RegistryDatabase):
        self.db = db

    def __repr__(self) -> str:
        return f"CharacterStore({self.db.where!r})"

    # -- reading ---------------------------------------------------------------------------------
    @staticmethod
    def _load_options() -> tuple[Any, ...]:
        return (
            selectinload(CharacterRow.references).selectinload(ReferenceRow.faces),
            selectinload(CharacterRow.centroids),
        )

    def get(self, character_id: str) -> Character:
        """The character ``character_id`` with its references, face analyses and centroids."""
        validate_character_id(character_id)
        with self.db.read() as s:
            row = s.scalars(
                select(CharacterRow).where(CharacterRow.id == character_id).options(*self._load_options())
            ).one_or_none()
            if row is None:
                raise self.db.unknown_character(character_id)
            return _character_from_row(row)

    def exists(self, character_id: str) -> bool:
        validate_character_id(character_id)
        with self.db.read() as s:
            return s.get(CharacterRow, character_id) is not None

    def ids(self, *, tenant: str | None = None) -> list[str]:
        """Every registered character id (of ``tenant``; None: of every tenant), sorted."""
        query = select(CharacterRow.id).order_by(CharacterRow.id)
        if tenant is not None:
            query = query.where(CharacterRow.tenant == validate_tenant_id(tenant))
        with self.db.read() as s:
            return list(s.scalars(query))

    def registrations(self, character_ids: Iterable[str]) -> dict[str, tuple[datetime, int]]:
        """(created at, version) of each of ``character_ids`` that exists: one light query.

        What a cache keyed by registration checks to drop tensors of deleted or changed characters.
        """
        wanted = sorted({validate_character_id(c) for c in character_ids})
        if not wanted:
            return {}
        query = select(CharacterRow.id, CharacterRow.created_at, CharacterRow.version).where(
            CharacterRow.id.in_(wanted)
        )
        with self.db.read() as s:
            return {cid: (created, version) for cid, created, version in s.execute(query)}

    def all(self, *, status: str | None = None, tenant: str | None = None) -> list[Character]:
        """Every character (optionally only those with ``status`` / of ``tenant``), sorted by id."""
        query = select(CharacterRow).options(*self._load_options()).order_by(CharacterRow.id)
        if status is not None:
            _check_status(status)
            query = query.where(CharacterRow.status == status)
        if tenant is not None:
            query = query.where(CharacterRow.tenant == validate_tenant_id(tenant))
        with self.db.read() as s:
            return [_character_from_row(row) for row in s.scalars(query)]

    def reference_bytes(self, character_id: str, digest: str) -> bytes:
        """The image bytes of one of ``character_id``'s references (hash-checked)."""
        validate_character_id(character_id)
        validate_digest(digest)
        with self.db.read() as s:
            if s.get(CharacterRow, character_id) is None:
                raise self.db.unknown_character(character_id)
            found = s.scalars(
                select(ReferenceRow.id).where(
                    ReferenceRow.character_id == character_id, ReferenceRow.blob_digest == digest
                )
            ).first()
        if found is None:
            raise InvalidReferenceError(
                f"character {character_id!r} has no reference {digest}; registry.characters.get(id).references "
                "lists its references"
            )
        try:
            return self.db.blobs.get(digest)
        except (BlobNotFoundError, CorruptBlobError) as exc:
            # the path goes to the log, not into the message: HTTP clients see this error
            logger.error("reference %s of %s is unreadable: %s", digest, character_id, exc)
            problem = "missing" if isinstance(exc, BlobNotFoundError) else "corrupt"
            raise type(exc)(
                f"reference {digest} of character {character_id!r} is {problem} in the blob store; "
                "an operator restores it from a backup (`Registry.verify()` lists every such blob)"
            ) from None

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

        The character is stored with ``version=1`` (or, for an id deleted before, the version after
        the deleted one's last) and fresh timestamps; its ``tenant``, ``status``, ``age_check``,
        ``report_passed`` and ``centroids`` are stored as given. All blobs are written first, then
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
        validate_new_character_id(char.id)  # the design drafts' ids are reserved
        refs = _coerce_references(references)
        if self.exists(char.id):
            raise self._duplicate(char.id)

        payloads: dict[str, bytes] = {}
        for index, ref in enumerate(refs):
            payloads[self.db.blobs.put(ref.data)] = ref.data
            if _after_blob_written is not None:
                _after_blob_written(index)
        if _after_blobs_written is not None:
            _after_blobs_written()

        now = _utcnow()
        try:
            with self.db.write() as s:
                tombstone = s.get(TombstoneRow, char.id)
                s.add(_character_row(char, now, version=1 if tombstone is None else tombstone.last_version + 1))
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
        self.db.ensure_blobs(payloads)
        if _after_commit is not None:
            _after_commit()
        logger.info("registered character %s with %d references", char.id, len(refs))
        return self.get(char.id)

    @staticmethod
    def _duplicate(character_id: str) -> DuplicateCharacterError:
        return DuplicateCharacterError(
            f"a character with id {character_id!r} is already registered; pick another id, or "
            "change the existing one (replace_references, update_card) or delete it first"
        )

    # -- changing a character --------------------------------------------------------------------
    def set_status(self, character_id: str, status: str) -> Character:
        """Store a new status; the version bumps when it changes. The checks live in safeguards."""
        validate_character_id(character_id)
        _check_status(status)
        with self.db.write() as s:
            row = self.db.lock_character(s, character_id)
            if row.status != status:
                row.status = status
                _bump(row)
        return self.get(character_id)

    def approve(self, character_id: str) -> Character:
        """``set_status(character_id, 'approved')`` (run the safeguards first)."""
        return self.set_status(character_id, "approved")

    def set_report_passed(self, character_id: str, passed: bool) -> Character:
        """Store whether the character's last reference report passed (no version bump: the
        references, and so the rendered face, did not change)."""
        validate_character_id(character_id)
        if not isinstance(passed, bool):
            raise InvalidCharacterError(
                f"report_passed must be True or False, got {type(passed).__name__}", field="report_passed"
            )
        with self.db.write() as s:
            row = self.db.lock_character(s, character_id)
            if row.report_passed is not passed:
                row.report_passed = passed
                row.updated_at = _utcnow()
        return self.get(character_id)

    def set_age_check(self, character_id: str, age_check: str) -> Character:
        """Store the apparent-age gate's result (``passed`` | ``unverified`` | ``failed``)."""
        validate_character_id(character_id)
        if age_check not in AGE_CHECKS:
            raise InvalidCharacterError(
                f"age_check {age_check!r} is not one of {', '.join(AGE_CHECKS)}", field="age_check"
            )
        with self.db.write() as s:
            row = self.db.lock_character(s, character_id)
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
        with self.db.write() as s:
            row = self.db.lock_character(s, character_id)
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
        refs: list[ReferenceInput],
        *,
        mode: str,
        remove: Sequence[str] = (),
    ) -> Character:
        validate_character_id(character_id)
        if not self.exists(character_id):
            raise self.db.unknown_character(character_id)
        payloads = {self.db.blobs.put(ref.data): ref.data for ref in refs}
        with self.db.write() as s:
            row = self.db.lock_character(s, character_id)
            existing = list(
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
                        "registry.characters.get(id).references lists its references"
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
            candidates = old_digests | _drop_derived(s, character_id)
            _bump(row)
        self.db.ensure_blobs(payloads)
        self.db.purge_unreferenced(candidates)
        return self.get(character_id)

    def set_centroid(self, character_id: str, backend: str, embedding: Any) -> None:
        """Store the identity centroid of ``character_id`` for face backend ``backend``."""
        validate_character_id(character_id)
        validate_name(backend, "face backend name")
        vector = as_embedding(embedding, f"centroid of {backend!r}")
        now = _utcnow()
        with self.db.write() as s:
            self.db.lock_character(s, character_id)
            row = s.get(CentroidRow, (character_id, backend))
            if row is None:
                s.add(CentroidRow(character_id=character_id, backend=backend, embedding=vector, updated_at=now))
            else:
                row.embedding = vector
                row.updated_at = now

    # -- deleting --------------------------------------------------------------------------------
    def delete(self, character_id: str) -> DeleteReport:
        """Remove every byte of a character: rows, reference images, embeddings, cached tensors.

        One transaction deletes the character's rows, its cached conditioning included, and
        leaves a tombstone (the id, its last version, the time): the only trace kept, so that a
        character registered later under the same id starts at a higher version. Blobs that
        another character still references are kept (and counted as shared). If the process dies
        after the rows are gone but before the files are, ``Registry.gc()`` removes them.
        The rows' bytes go too: ``secure_delete`` zeroes the freed pages and the WAL is
        checkpointed (SQLite).
        """
        validate_character_id(character_id)
        with self.db.write() as s:
            row = self.db.lock_character(s, character_id)
            _write_tombstone(s, character_id, row.version)
            ref_ids = list(s.scalars(select(ReferenceRow.id).where(ReferenceRow.character_id == character_id)))
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
        removed, freed, shared = self.db.purge_unreferenced(candidates)
        self.db.checkpoint()
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


# -- helpers ---------------------------------------------------------------------------------------
def _write_tombstone(s: Session, character_id: str, version: int) -> None:
    tombstone = s.get(TombstoneRow, character_id)
    if tombstone is None:
        s.add(TombstoneRow(id=character_id, last_version=version, deleted_at=_utcnow()))
    else:
        tombstone.last_version = max(tombstone.last_version, version)
        tombstone.deleted_at = _utcnow()


def _drop_derived(s: Session, character_id: str) -> set[str]:
    """Delete the cached conditioning and centroids of a character; returns the cache's blobs."""
    digests = set(s.scalars(select(ConditioningRow.blob_digest).where(ConditioningRow.character_id == character_id)))
    s.execute(delete(ConditioningRow).where(ConditioningRow.character_id == character_id))
    s.execute(delete(CentroidRow).where(CentroidRow.character_id == character_id))
    return digests


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise InvalidCharacterError(f"status {status!r} is not one of {', '.join(STATUSES)}", field="status")


def _bump(row: CharacterRow) -> None:
    row.version = row.version + 1
    row.updated_at = _utcnow()


def _coerce_character(character: Character | Mapping[str, Any]) -> Character:
    if isinstance(character, Character):
        return Character.model_validate(character.model_dump())
    if isinstance(character, Mapping):
        return Character.model_validate(dict(character))
    raise InvalidCharacterError(f"expected a Character, got a {type(character).__name__}")


def _coerce_references(references: Sequence[ReferenceInput | Mapping[str, Any]]) -> list[ReferenceInput]:
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


def _character_row(char: Character, now: datetime, *, version: int) -> CharacterRow:
    return CharacterRow(
        id=char.id,
        tenant=char.tenant,
        name=char.name,
        card=char.card.model_dump(mode="json"),
        provenance_kind=char.provenance.kind,
        provenance_creator=char.provenance.creator,
        provenance_date=char.provenance.date,
        provenance_evidence=char.provenance.evidence,
        status=char.status,
        age_check=char.age_check,
        report_passed=char.report_passed,
        version=version,
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
            "tenant": row.tenant,
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
            "report_passed": row.report_passed,
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
