"""Designs at rest: two tables in the registry's database and one storage prefix of bytes per design.

A design is owned by a tenant (and, through the API, by the key that started it), is stored like a
job (a row that survives any process; its bytes in the deployment's storage, ``IMAGEGEN_STORAGE_URL``
or ``IMAGEGEN_HOME``, where every node reads them) and expires: ``expires_at`` is set when it is
created, an expired design is answered as missing at once and deleted by the next sweep
(``expire``). Deleting a design removes every byte it made: its rows, its images (candidates,
uploads, slots) and its draft identity tensors, which all live under ``designs/<design id>/`` of
the storage — one prefix per design, named by the id this module generated, never by user input —
so a delete is one row delete and the removal of one prefix.

Tables (a change here needs a revision in ``imagegen.migrations``)::

    designs        id PK, tenant (indexed), key_id, character_id, name, card JSON, preset, method,
                   stage, status, job_id, error, draft_key (unique), seed, grid JSON, pick JSON,
                   report JSON, created_at, updated_at, expires_at (indexed)
    design_images  id PK (the image id), design_id FK (indexed, cascade), kind, idx, digest (pixels),
                   blob (PNG bytes), origin, recipe JSON, face JSON, slot JSON, kept, analysable,
                   similarity, outlier, created_at
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Integer, String, Text, delete, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from imagegen.blobstore import BlobStore
from imagegen.db import SessionScopes, UTCDateTime, checkpoint_wal, create_database_engine, utcnow
from imagegen.errors import ImagegenError
from imagegen.ids import DRAFT_PREFIX
from imagegen.migrations import prepare, where_of
from imagegen.settings import Settings, get_settings
from imagegen.storage import LocalObjects, ObjectNotFoundError, ObjectStore, open_storage

log = logging.getLogger(__name__)

#: a design nobody registers or deletes is deleted after this long (the service's ``design_ttl_s``)
DEFAULT_TTL_S = 7 * 24 * 3600.0
STAGES = ("describe", "pick", "turnaround", "curate", "registered")
STATUSES = ("rendering", "ready", "failed")


class UnknownDesignError(ImagegenError):
    """A design that does not exist (or belongs to someone else, or expired)."""

    code = "not_found"
    field = "design_id"


class DesignExpiredError(UnknownDesignError):
    """A design past its ``expires_at``: answered as missing; the caller deletes it (``expire`` / the service)."""

    def __init__(self, design_id: str):
        super().__init__(f"no design {design_id!r} (it expired)")
        self.design_id = design_id


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class DesignRow(Base):
    __tablename__ = "designs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str | None] = mapped_column(String(32))
    character_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    card: Mapped[dict[str, Any]]
    preset: Mapped[str] = mapped_column(String(64))
    method: Mapped[str | None] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    draft_key: Mapped[str] = mapped_column(String(64), unique=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    grid: Mapped[list[Any] | None]
    pick: Mapped[dict[str, Any] | None]
    report: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)


class DesignImageRow(Base):
    __tablename__ = "design_images"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    design_id: Mapped[str] = mapped_column(String(32), ForeignKey("designs.id", ondelete="CASCADE"), index=True)
    #: candidate | upload | slot
    kind: Mapped[str] = mapped_column(String(16))
    idx: Mapped[int] = mapped_column(Integer)
    #: SHA-256 of the decoded pixels (``recipe.pixel_digest``): what recipe chains name
    digest: Mapped[str] = mapped_column(String(64))
    #: SHA-256 of the stored PNG bytes (the name in the design's blob store)
    blob: Mapped[str] = mapped_column(String(64))
    #: rendered | upload
    origin: Mapped[str] = mapped_column(String(16))
    recipe: Mapped[dict[str, Any] | None]
    face: Mapped[dict[str, Any] | None]
    slot: Mapped[dict[str, Any] | None]
    kept: Mapped[bool] = mapped_column(Boolean, default=True)
    analysable: Mapped[bool] = mapped_column(Boolean, default=True)
    similarity: Mapped[float | None] = mapped_column(Float)
    outlier: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]


@dataclass
class DesignImage:
    """One image of a design: a candidate, an upload or a turnaround slot."""

    id: str
    kind: str
    index: int
    digest: str
    origin: str
    blob: str = ""
    recipe: dict[str, Any] | None = None
    face: dict[str, Any] | None = None
    slot: dict[str, Any] | None = None
    kept: bool = True
    analysable: bool = True
    similarity: float | None = None
    outlier: bool = False

    @property
    def label(self) -> str:
        return f"{self.kind} {self.index}"

    def chain_record(self) -> dict[str, Any]:
        return {"digest": self.digest, "origin": self.origin, "recipe": self.recipe, "label": self.label}

    @classmethod
    def from_row(cls, row: DesignImageRow) -> DesignImage:
        return cls(
            id=row.id,
            kind=row.kind,
            index=row.idx,
            digest=row.digest,
            origin=row.origin,
            blob=row.blob,
            recipe=None if row.recipe is None else dict(row.recipe),
            face=None if row.face is None else dict(row.face),
            slot=None if row.slot is None else dict(row.slot),
            kept=bool(row.kept),
            analysable=bool(row.analysable),
            similarity=row.similarity,
            outlier=bool(row.outlier),
        )


@dataclass
class Design:
    """A design's state (its images are read separately: ``DesignStore.images``)."""

    id: str
    tenant: str
    key_id: str | None
    character_id: str
    name: str
    card: dict[str, Any]
    preset: str
    method: str | None
    stage: str
    status: str
    job_id: str | None
    error: str | None
    draft_key: str
    seed: int
    grid: list[Any] | None
    pick: dict[str, Any] | None
    report: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    images: list[DesignImage] = field(default_factory=list)

    @property
    def expired(self) -> bool:
        return self.expires_at <= utcnow()

    def of_kind(self, kind: str) -> list[DesignImage]:
        return sorted((i for i in self.images if i.kind == kind), key=lambda i: i.index)

    @classmethod
    def from_row(cls, row: DesignRow, images: Sequence[DesignImageRow] = ()) -> Design:
        return cls(
            id=row.id,
            tenant=row.tenant,
            key_id=row.key_id,
            character_id=row.character_id,
            name=row.name,
            card=dict(row.card),
            preset=row.preset,
            method=row.method,
            stage=row.stage,
            status=row.status,
            job_id=row.job_id,
            error=row.error,
            draft_key=row.draft_key,
            seed=int(row.seed),
            grid=None if row.grid is None else list(row.grid),
            pick=None if row.pick is None else dict(row.pick),
            report=None if row.report is None else dict(row.report),
            created_at=row.created_at,
            updated_at=row.updated_at,
            expires_at=row.expires_at,
            images=[DesignImage.from_row(r) for r in images],
        )


@dataclass(frozen=True)
class DesignDeleted:
    """What deleting a design removed."""

    design_id: str
    images: int
    files: int
    bytes_removed: int


class DesignStore(SessionScopes):
    """The design tables and each design's folder of bytes. Thread-safe: every call opens its own session."""

    def __init__(self, url: str, objects: ObjectStore | str | os.PathLike[str]):
        """``objects``: where the designs' bytes go (an ``ObjectStore``, a directory or a storage URL)."""
        self.url = make_url(url)
        self.objects = objects if isinstance(objects, ObjectStore) else open_storage(objects)
        self.engine = create_database_engine(self.url, synchronous="NORMAL", secure_delete=True)
        try:
            prepare(self.engine, Base.metadata, where_of(self.url))
        except BaseException:
            self.engine.dispose()
            raise
        self._open_sessions()

    @classmethod
    def open(cls, settings: Settings | None = None) -> DesignStore:
        settings = settings or get_settings()
        settings.home.mkdir(parents=True, exist_ok=True)
        return cls(settings.registry_url, open_storage(settings.storage_root).child("designs"))

    # -- where bytes live ------------------------------------------------------------------------
    @staticmethod
    def prefix(design_id: str) -> str:
        """The storage prefix of a design's bytes (its id, checked: a malformed one is simply unknown)."""
        if not (len(design_id) == 32 and all(c in "0123456789abcdef" for c in design_id)):
            raise UnknownDesignError(f"no design {design_id[:40]!r}")
        return design_id

    def blobs(self, design_id: str) -> BlobStore:
        return BlobStore(self.objects.child(f"{self.prefix(design_id)}/images"))

    # -- designs ---------------------------------------------------------------------------------
    def create(
        self,
        *,
        tenant: str,
        key_id: str | None,
        character_id: str,
        name: str,
        card: dict[str, Any],
        preset: str,
        seed: int,
        ttl_s: float = DEFAULT_TTL_S,
        stage: str = "describe",
        status: str = "rendering",
    ) -> Design:
        now = utcnow()
        row = DesignRow(
            id=secrets.token_hex(16),
            tenant=tenant,
            key_id=key_id,
            character_id=character_id,
            name=name,
            card=card,
            preset=preset,
            method=None,
            stage=stage,
            status=status,
            job_id=None,
            error=None,
            draft_key=DRAFT_PREFIX + secrets.token_hex(16),
            seed=seed,
            grid=None,
            pick=None,
            report=None,
            created_at=now,
            updated_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
        )
        with self._write() as s:
            s.add(row)
            s.flush()
            return Design.from_row(row)

    def get(self, design_id: str, *, expired_too: bool = False) -> Design:
        """The design with its images; ``UnknownDesignError`` when missing, ``DesignExpiredError`` when expired
        (unless ``expired_too``: deleting an expired design needs what it holds)."""
        self.prefix(design_id)  # malformed ids are simply unknown
        with self._read() as s:
            row = s.get(DesignRow, design_id)
            if row is None:
                raise UnknownDesignError(f"no design {design_id!r}")
            images = s.scalars(select(DesignImageRow).where(DesignImageRow.design_id == design_id)).all()
            design = Design.from_row(row, images)
        if design.expired and not expired_too:
            raise DesignExpiredError(design_id)
        return design

    def find(self, tenant: str, character_id: str) -> Design:
        """The newest live design of ``character_id`` for ``tenant`` (the CLI names designs by character)."""
        with self._read() as s:
            design_id = s.scalars(
                select(DesignRow.id)
                .where(DesignRow.tenant == tenant, DesignRow.character_id == character_id)
                .where(DesignRow.expires_at > utcnow())
                .order_by(DesignRow.created_at.desc())
                .limit(1)
            ).first()
        if design_id is None:
            raise UnknownDesignError(
                f"no design of '{character_id}'; start one with `imagegen characters design {character_id} --card ...`"
            )
        return self.get(design_id)

    def by_draft_key(self, draft_key: str) -> Design | None:
        """The live design whose draft identity is ``draft_key`` (None: no such design)."""
        with self._read() as s:
            design_id = s.scalars(select(DesignRow.id).where(DesignRow.draft_key == draft_key)).first()
        if design_id is None:
            return None
        try:
            return self.get(design_id)
        except UnknownDesignError:
            return None

    def list(self, tenant: str | None, limit: int = 100) -> list[Design]:
        """Live designs (of ``tenant``; None: every tenant), newest first, without their images."""
        query = select(DesignRow).where(DesignRow.expires_at > utcnow()).order_by(DesignRow.created_at.desc())
        if tenant is not None:
            query = query.where(DesignRow.tenant == tenant)
        with self._read() as s:
            rows = s.scalars(query.limit(limit)).all()
            images = s.scalars(select(DesignImageRow).where(DesignImageRow.design_id.in_([r.id for r in rows]))).all()
        by_design: dict[str, list[DesignImageRow]] = {}
        for image in images:
            by_design.setdefault(image.design_id, []).append(image)
        return [Design.from_row(r, by_design.get(r.id, [])) for r in rows]

    def update(self, design_id: str, **fields: Any) -> Design:
        """Set design fields (stage, status, job_id, error, method, grid, pick, report); returns the design."""
        allowed = {"stage", "status", "job_id", "error", "method", "grid", "pick", "report", "character_id", "name"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")
        with self._write() as s:
            changed = s.execute(
                update(DesignRow).where(DesignRow.id == design_id).values(**fields, updated_at=utcnow())
            ).rowcount
        if not changed:
            raise UnknownDesignError(f"no design {design_id!r}")
        return self.get(design_id)

    def set_expiry(self, design_id: str, expires_at: datetime) -> None:
        """Move a design's expiry (an operator keeping one longer; tests making one expire now)."""
        with self._write() as s:
            s.execute(update(DesignRow).where(DesignRow.id == design_id).values(expires_at=expires_at))

    def claim(self, design_id: str, expect_status: Iterable[str], **fields: Any) -> bool:
        """Update ``fields`` only while the design's status is one of ``expect_status`` (no two jobs at once)."""
        with self._write() as s:
            changed = s.execute(
                update(DesignRow)
                .where(DesignRow.id == design_id, DesignRow.status.in_(list(expect_status)))
                .values(**fields, updated_at=utcnow())
            ).rowcount
        return bool(changed)

    # -- images ----------------------------------------------------------------------------------
    def add_images(self, design_id: str, images: Sequence[tuple[DesignImage, bytes]]) -> list[DesignImage]:
        """Store images (PNG bytes first, then all rows in one transaction); returns them with their blobs."""
        blobs = self.blobs(design_id)
        stored = [replace(image, blob=blobs.put(png)) for image, png in images]
        now = utcnow()
        with self._write() as s:
            alive = s.get(DesignRow, design_id) is not None
            if alive:
                for image in stored:
                    s.add(_image_row(design_id, image, now))
        if not alive:
            self._purge(design_id)  # deleted while these were made: leave no bytes behind
            raise UnknownDesignError(f"no design {design_id!r} (deleted meanwhile)")
        return stored

    def replace_images(
        self, design_id: str, remove: Iterable[str], images: Sequence[tuple[DesignImage, bytes]]
    ) -> None:
        """Swap images in one transaction: rows ``remove`` go, ``images`` come (re-rolls, a new turnaround)."""
        blobs = self.blobs(design_id)
        stored = [replace(image, blob=blobs.put(png)) for image, png in images]
        remove = list(remove)
        now = utcnow()
        with self._write() as s:
            alive = s.get(DesignRow, design_id) is not None
            gone: list[str] = []
            still: set[str] = set()
            if alive:
                if remove:
                    gone = list(s.scalars(select(DesignImageRow.blob).where(DesignImageRow.id.in_(remove))).all())
                    s.execute(
                        delete(DesignImageRow).where(
                            DesignImageRow.design_id == design_id, DesignImageRow.id.in_(remove)
                        )
                    )
                for image in stored:
                    s.add(_image_row(design_id, image, now))
                s.flush()
                still = set(s.scalars(select(DesignImageRow.blob).where(DesignImageRow.design_id == design_id)).all())
        if not alive:
            self._purge(design_id)  # deleted while these were made: leave no bytes behind
            raise UnknownDesignError(f"no design {design_id!r} (deleted meanwhile)")
        for blob in set(gone) - still:
            blobs.delete(blob)

    def set_image_fields(self, design_id: str, updates: dict[str, dict[str, Any]]) -> None:
        """Per image id: kept, analysable, similarity, outlier, face."""
        allowed = {"kept", "analysable", "similarity", "outlier", "face"}
        with self._write() as s:
            for image_id, values in updates.items():
                if set(values) - allowed:
                    raise ValueError(f"cannot update {sorted(set(values) - allowed)}")
                s.execute(
                    update(DesignImageRow)
                    .where(DesignImageRow.design_id == design_id, DesignImageRow.id == image_id)
                    .values(**values)
                )

    def image_bytes(self, design: Design, image_id: str) -> bytes:
        for image in design.images:
            if image.id == image_id:
                return self.blobs(design.id).get(image.blob)
        raise UnknownDesignError(f"design {design.id} has no image {image_id[:40]!r}", field="image_id")

    # -- the draft identity ----------------------------------------------------------------------
    def _draft_key(self, design_id: str, name: str) -> str:
        return f"{self.prefix(design_id)}/identity/{name}.safetensors"

    def draft_tensors(self, design_id: str, name: str) -> dict | None:
        try:
            return load_tensors(self.objects.get(self._draft_key(design_id, name)))
        except ObjectNotFoundError:
            return None

    def put_draft_tensors(self, design_id: str, name: str, tensors: dict) -> None:
        """Cache a draft identity with the design's bytes; dropped again when the design is gone meanwhile."""
        self.objects.put(
            self._draft_key(design_id, name), save_tensors({k: v.contiguous() for k, v in tensors.items()})
        )
        with self._read() as s:
            alive = s.get(DesignRow, design_id) is not None
        if not alive:  # deleted while the tensors were computed: leave no bytes behind
            self._purge(design_id)

    def drop_draft_tensors(self, design_id: str) -> None:
        """Forget the draft identity (the pick changed)."""
        for info in list(self.objects.list(f"{self.prefix(design_id)}/identity")):
            self.objects.delete(info.key)

    def _purge(self, design_id: str) -> tuple[int, int]:
        """Delete every object under the design's prefix; (files, bytes) removed."""
        files = size = 0
        for info in list(self.objects.list(self.prefix(design_id))):
            size += self.objects.delete(info.key)
            files += 1
        if isinstance(self.objects, LocalObjects):  # and the emptied directories
            shutil.rmtree(self.objects.root / self.prefix(design_id), ignore_errors=True)
        return files, size

    # -- deleting --------------------------------------------------------------------------------
    def delete(self, design_id: str) -> DesignDeleted:
        """Delete the design's rows and every byte under its prefix (images, draft identity)."""
        self.prefix(design_id)
        with self._write() as s:
            images = s.execute(delete(DesignImageRow).where(DesignImageRow.design_id == design_id)).rowcount
            found = s.execute(delete(DesignRow).where(DesignRow.id == design_id)).rowcount
        if not found:
            raise UnknownDesignError(f"no design {design_id!r}")
        files, size = self._purge(design_id)
        checkpoint_wal(self.engine)
        log.info("deleted design %s: %d images, %d files, %d bytes", design_id, images, files, size)
        return DesignDeleted(design_id, images, files, size)

    def expired_ids(self) -> list[str]:
        with self._read() as s:
            return list(s.scalars(select(DesignRow.id).where(DesignRow.expires_at <= utcnow())).all())

    def expire(self) -> list[DesignDeleted]:
        """Delete every expired design (rows and bytes); returns what went."""
        gone = []
        for design_id in self.expired_ids():
            try:
                gone.append(self.delete(design_id))
            except UnknownDesignError:  # another process deleted it first
                continue
        return gone


def _image_row(design_id: str, image: DesignImage, now: datetime) -> DesignImageRow:
    return DesignImageRow(
        id=image.id,
        design_id=design_id,
        kind=image.kind,
        idx=image.index,
        digest=image.digest,
        blob=image.blob,
        origin=image.origin,
        recipe=image.recipe,
        face=image.face,
        slot=image.slot,
        kept=image.kept,
        analysable=image.analysable,
        similarity=image.similarity,
        outlier=image.outlier,
        created_at=now,
    )
