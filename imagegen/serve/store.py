"""The serving tables: API keys, durable jobs with their events, and the per-image audit trail.

They live in the registry database (``get_settings().registry_url``: SQLite in WAL mode by
default, any SQLAlchemy URL otherwise) next to the registry's tables, but in their own metadata:
the registry never touches them. Job images are stored by digest in a content-addressed blob
store of their own (``serve/results`` under ``IMAGEGEN_STORAGE_URL``, else ``IMAGEGEN_HOME``),
never the registry's (its ``gc`` would delete them); rows hold digests only, never a path, so any
ingress replica on any node serves any job's images.

Tables (at the head revision of ``imagegen.migrations``; a change here needs a revision there)::

    api_keys          id PK, tenant, name, secret_sha256, scopes JSON, created_at, revoked_at, last_used_at
    serve_jobs        id PK, tenant, key_id, character (indexed), preset, status, request JSON, attempts,
                      owner, heartbeat_at, progress JSON, result JSON, error_code, error_message,
                      created_at, started_at, finished_at
    serve_job_events  id PK (autoincrement, the SSE event id), job_id FK, type, data JSON, created_at
    render_audit      image_id PK, request_id, job_id, key_id, tenant, preset, character, character_version,
                      method, prompt_sha256, seed, watermark_tag, created_at, redacted_at
    character_renders image_id PK, tenant, key_id, character (indexed), character_version, request_id, job_id,
                      image_index, preset, method, prompt, identity_weight, seed, width, height, similarity,
                      threshold, passed, backend, created_at (indexed)
    eval_runs         id PK, tenant (indexed), key_id, suite, status, characters JSON, spec JSON, progress JSON,
                      summary JSON, files JSON, verdict, error_code, error_message, owner, heartbeat_at,
                      created_at (indexed), started_at, finished_at

``character_renders`` is what a character's page lists as its recent renders (prompt, weight,
score, threshold): unlike the audit trail it holds the prompt, so it keeps a render only as long as
jobs are kept (``job_ttl_s``) and a deleted character's rows are deleted, not redacted.
``eval_runs`` are evaluation runs submitted through the API (``serve/evalruns.py``); the files of
their run directories (``report.html``, ``metrics.json``, ``junit.xml``) are blobs of the results
store named in ``files``, so any ingress replica serves them.

Deleting a character removes what the service kept of it (``purge_character``): the jobs that
rendered it (rows, events, result PNGs) go; its audit rows stay but lose the character's id and
version (``redacted_at`` says when), so a watermark look-up still answers "an image this service
made, of a since-deleted character". The audit trail never held the prompt, only its SHA-256.
SQLite runs with ``secure_delete`` and the WAL is checkpointed after a purge, so freed pages do
not keep the bytes; on PostgreSQL deleted tuples stay in the table files until ``VACUUM`` reclaims
them (autovacuum does it in time; run ``VACUUM`` on ``serve_jobs`` and ``serve_job_events`` when a
deletion must take effect on disk at once). The purge also deletes the character's
``character_renders`` rows and every API evaluation run that rendered it (row and files).
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from imagegen.blobstore import BlobStore
from imagegen.db import SessionScopes, UTCDateTime, checkpoint_wal, create_database_engine, utcnow
from imagegen.identity.registry.schema import TombstoneRow
from imagegen.ids import DEFAULT_TENANT, validate_tenant_id
from imagegen.migrations import prepare, read_state, where_of
from imagegen.settings import Settings, get_settings

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
TERMINAL = ("done", "failed", "cancelled")
#: PostgreSQL advisory lock (transaction-scoped) that serialises capped job inserts of every process
JOB_CAPS_LOCK = zlib.crc32(b"imagegen-job-caps")


class JobCapReached(Exception):
    """A job not stored: ``active`` jobs are queued or running, at ``limit`` (``scope``: ``key`` or ``total``)."""

    def __init__(self, scope: str, active: int, limit: int):
        super().__init__(f"{active} active jobs ({scope}), limit {limit}")
        self.scope, self.active, self.limit = scope, active, limit


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: the tenant whose characters the key sees (keys created before tenancy: the default tenant)
    tenant: Mapped[str] = mapped_column(String(64), server_default=DEFAULT_TENANT)
    name: Mapped[str] = mapped_column(String(200))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[Any]]
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class JobRow(Base):
    __tablename__ = "serve_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), server_default=DEFAULT_TENANT)
    key_id: Mapped[str] = mapped_column(String(32), index=True)
    #: the character the job renders (None: no character), so deleting a character finds its jobs
    character: Mapped[str | None] = mapped_column(String(64), index=True)
    preset: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    request: Mapped[dict[str, Any]]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None]
    progress: Mapped[dict[str, Any]]
    result: Mapped[dict[str, Any] | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class JobEventRow(Base):
    __tablename__ = "serve_job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("serve_jobs.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class AuditRow(Base):
    __tablename__ = "render_audit"

    image_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), index=True)
    job_id: Mapped[str | None] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(32))
    tenant: Mapped[str] = mapped_column(String(64), server_default=DEFAULT_TENANT)
    preset: Mapped[str] = mapped_column(String(64))
    character: Mapped[str | None] = mapped_column(String(64))
    character_version: Mapped[int | None] = mapped_column(Integer)
    method: Mapped[str | None] = mapped_column(String(64))
    prompt_sha256: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    watermark_tag: Mapped[int | None] = mapped_column(BigInteger, index=True)
    created_at: Mapped[datetime]
    #: when the character was deleted and ``character`` / ``character_version`` cleared
    redacted_at: Mapped[datetime | None]


class CharacterRenderRow(Base):
    """A served image of a character with its score: what the character's page lists as a recent render."""

    __tablename__ = "character_renders"

    image_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(32))
    character: Mapped[str] = mapped_column(String(64), index=True)
    character_version: Mapped[int | None] = mapped_column(Integer)
    request_id: Mapped[str] = mapped_column(String(128))
    job_id: Mapped[str | None] = mapped_column(String(32))
    #: the image's index in its request (a job's images are fetched by it)
    image_index: Mapped[int] = mapped_column(Integer)
    preset: Mapped[str] = mapped_column(String(64))
    method: Mapped[str | None] = mapped_column(String(64))
    prompt: Mapped[str] = mapped_column(Text)
    identity_weight: Mapped[float | None] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    #: identity similarity to the character's centroid (None: the render was not scored)
    similarity: Mapped[float | None] = mapped_column(Float)
    #: the consistency gate's threshold the render was held to (None: no gate)
    threshold: Mapped[float | None] = mapped_column(Float)
    passed: Mapped[bool | None] = mapped_column(Boolean)
    #: the face backend that scored it
    backend: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(index=True)


class EvalRunRow(Base):
    """An evaluation run submitted through the API, owned by a tenant."""

    __tablename__ = "eval_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str] = mapped_column(String(32))
    suite: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    #: the characters the run renders (deleting one deletes the run)
    characters: Mapped[list[Any]]
    spec: Mapped[dict[str, Any]]
    progress: Mapped[dict[str, Any]]
    summary: Mapped[dict[str, Any] | None]
    #: the run directory's files kept: name -> digest in the results store
    files: Mapped[dict[str, Any]]
    verdict: Mapped[str | None] = mapped_column(String(16))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


@dataclass
class EvalRun:
    id: str
    tenant: str
    key_id: str
    suite: str
    status: str
    characters: list[str]
    spec: dict[str, Any]
    progress: dict[str, Any]
    summary: dict[str, Any] | None
    files: dict[str, str]
    verdict: str | None
    error_code: str | None
    error_message: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: EvalRunRow) -> EvalRun:
        return cls(
            id=row.id,
            tenant=row.tenant,
            key_id=row.key_id,
            suite=row.suite,
            status=row.status,
            characters=list(row.characters or []),
            spec=dict(row.spec or {}),
            progress=dict(row.progress or {}),
            summary=None if row.summary is None else dict(row.summary),
            files=dict(row.files or {}),
            verdict=row.verdict,
            error_code=row.error_code,
            error_message=row.error_message,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


@dataclass
class Job:
    id: str
    key_id: str
    tenant: str
    character: str | None
    preset: str
    status: str
    request: dict[str, Any]
    attempts: int
    owner: str | None
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error_code: str | None
    error_message: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def kind(self) -> str:
        """``design`` for a step of ``/v1/designs`` (its request says so), ``render`` for a render job."""
        return "design" if self.request.get("kind") == "design" else "render"

    @classmethod
    def from_row(cls, row: JobRow) -> Job:
        return cls(
            id=row.id,
            key_id=row.key_id,
            tenant=row.tenant,
            character=row.character,
            preset=row.preset,
            status=row.status,
            request=dict(row.request),
            attempts=row.attempts,
            owner=row.owner,
            progress=dict(row.progress or {}),
            result=None if row.result is None else dict(row.result),
            error_code=row.error_code,
            error_message=row.error_message,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


@dataclass
class JobEvent:
    id: int
    job_id: str
    type: str
    data: dict[str, Any]
    created_at: datetime


@dataclass
class ApiKey:
    id: str
    name: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    secret_sha256: str = ""
    tenant: str = DEFAULT_TENANT

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "tenant": self.tenant,
            "scopes": self.scopes,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None,
        }


def _key_from_row(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        scopes=list(row.scopes),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
        secret_sha256=row.secret_sha256,
        tenant=row.tenant,
    )


def _event_from_row(row: JobEventRow) -> JobEvent:
    return JobEvent(id=row.id, job_id=row.job_id, type=row.type, data=dict(row.data), created_at=row.created_at)


class ServeStore(SessionScopes):
    """The serving tables. Thread-safe: every call opens its own session."""

    def __init__(self, url: str, results_root: BlobStore | Path | str):
        self.url = make_url(url)
        #: job images by digest: a directory or a bucket every ingress replica reads (``imagegen.storage``)
        self.results = results_root if isinstance(results_root, BlobStore) else BlobStore(results_root)
        self.engine = self._create_engine()
        try:
            # a fresh database is created at head; an older or newer one is refused (SchemaError)
            prepare(self.engine, Base.metadata, self.where, also=[TombstoneRow.__table__])
        except BaseException:
            self.engine.dispose()
            raise
        self._open_sessions()

    @property
    def where(self) -> str:
        """The database URL with its password hidden: for operator messages only, never HTTP errors."""
        return where_of(self.url)

    @property
    def schema_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return read_state(conn).revision

    @classmethod
    def open(cls, settings: Settings | None = None) -> ServeStore:
        settings = settings or get_settings()
        settings.home.mkdir(parents=True, exist_ok=True)
        return cls(settings.registry_url, BlobStore.open(settings, "serve/results"))

    def _create_engine(self) -> Engine:
        # jobs and audit rows: a crash may lose the OS's last buffered transactions, never corrupt the
        # file; deleted rows (a purged character's prompts) are overwritten, not left in free pages
        return create_database_engine(self.url, synchronous="NORMAL", secure_delete=True)

    def ping(self) -> None:
        with self._read() as s:
            s.execute(select(func.count()).select_from(ApiKeyRow)).scalar_one()

    # -- API keys ------------------------------------------------------------------------------
    def add_key(
        self, key_id: str, name: str, secret_sha256: str, scopes: Sequence[str], tenant: str = DEFAULT_TENANT
    ) -> ApiKey:
        tenant = validate_tenant_id(tenant)
        with self._write() as s:
            row = ApiKeyRow(
                id=key_id,
                tenant=tenant,
                name=name,
                secret_sha256=secret_sha256,
                scopes=list(scopes),
                created_at=utcnow(),
                revoked_at=None,
                last_used_at=None,
            )
            s.add(row)
            s.flush()
            return _key_from_row(row)

    def get_key(self, key_id: str) -> ApiKey | None:
        with self._read() as s:
            row = s.get(ApiKeyRow, key_id)
            return None if row is None else _key_from_row(row)

    def list_keys(self) -> list[ApiKey]:
        with self._read() as s:
            return [_key_from_row(r) for r in s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))]

    def revoke_key(self, key_id: str) -> ApiKey | None:
        with self._write() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None:
                return None
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return _key_from_row(row)

    def touch_key(self, key_id: str) -> None:
        with self._write() as s:
            s.execute(update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_used_at=utcnow()))

    # -- jobs ----------------------------------------------------------------------------------
    def create_job(
        self,
        job_id: str,
        key_id: str,
        preset: str,
        request: dict[str, Any],
        total: int,
        *,
        tenant: str,
        character: str | None,
        key_cap: int | None = None,
        total_cap: int | None = None,
    ) -> Job:
        """Store a queued job of ``key_id`` (owned by ``tenant``) rendering ``character`` (or none).

        ``key_cap`` / ``total_cap``: refuse (``JobCapReached``, nothing written) when ``key_id`` /
        every key already has that many jobs queued or running. The count and the insert are one
        step for every process sharing the database (``_hold_job_caps``), so concurrent submissions
        from any number of ingress replicas never get past a cap.
        """
        tenant = validate_tenant_id(tenant)
        now = utcnow()
        with self._write() as s:
            if key_cap is not None or total_cap is not None:
                self._hold_job_caps(s)
                active = select(func.count()).where(JobRow.status.in_(ACTIVE))
                if key_cap is not None:
                    mine = int(s.execute(active.where(JobRow.key_id == key_id)).scalar_one())
                    if mine >= key_cap:
                        raise JobCapReached("key", mine, key_cap)
                if total_cap is not None:
                    everyone = int(s.execute(active).scalar_one())
                    if everyone >= total_cap:
                        raise JobCapReached("total", everyone, total_cap)
            row = JobRow(
                id=job_id,
                tenant=tenant,
                key_id=key_id,
                character=character,
                preset=preset,
                status="queued",
                request=request,
                attempts=0,
                owner=None,
                heartbeat_at=None,
                progress={"images_done": 0, "images_total": total},
                result=None,
                error_code=None,
                error_message=None,
                created_at=now,
                started_at=None,
                finished_at=None,
            )
            s.add(row)
            s.flush()
            self._event(s, job_id, "queued", {"status": "queued", "preset": preset, "images": total})
            return Job.from_row(row)

    @staticmethod
    def _hold_job_caps(s: Session) -> None:
        """Serialise "count the active jobs, then insert" with every other capped insert, in any process.

        SQLite: nothing to do, the write transaction began ``IMMEDIATE`` (``_write``) and holds the
        database's one write lock until it ends. PostgreSQL: a transaction-scoped advisory lock,
        released at commit or rollback; under READ COMMITTED (the default, which the store keeps)
        each later statement sees the jobs committed by whoever held it before.
        """
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": JOB_CAPS_LOCK})

    @staticmethod
    def _event(s: Session, job_id: str, kind: str, data: dict[str, Any]) -> None:
        s.add(JobEventRow(job_id=job_id, type=kind, data=data, created_at=utcnow()))

    def get_job(self, job_id: str) -> Job | None:
        with self._read() as s:
            row = s.get(JobRow, job_id)
            return None if row is None else Job.from_row(row)

    def list_jobs(self, key_id: str | None, limit: int = 50) -> list[Job]:
        query = select(JobRow).order_by(JobRow.created_at.desc()).limit(limit)
        if key_id is not None:
            query = query.where(JobRow.key_id == key_id)
        with self._read() as s:
            return [Job.from_row(r) for r in s.scalars(query)]

    def count_active_jobs(self) -> int:
        with self._read() as s:
            return int(s.execute(select(func.count()).where(JobRow.status.in_(ACTIVE))).scalar_one())

    def job_counts(self) -> dict[str, int]:
        with self._read() as s:
            rows = s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all()
        return {status: int(count) for status, count in rows}

    def claim_jobs(self, owner: str, limit: int, max_attempts: int) -> list[Job]:
        """Take up to ``limit`` queued jobs (oldest first) for ``owner``; each claim counts an attempt."""
        if limit <= 0:
            return []
        now = utcnow()
        claimed = []
        with self._write() as s:
            rows = list(
                s.scalars(
                    select(JobRow)
                    .where(JobRow.status == "queued")
                    .order_by(JobRow.created_at)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            )
            for row in rows:
                if row.attempts >= max_attempts:  # defensive: never start an attempt beyond the limit
                    self._fail_row(s, row, "retries_exhausted", f"the job was attempted {row.attempts} times")
                    continue
                row.status, row.owner, row.attempts = "running", owner, row.attempts + 1
                row.heartbeat_at = now
                row.started_at = row.started_at or now
                self._event(s, row.id, "started", {"status": "running", "attempt": row.attempts, "owner": owner})
                claimed.append(Job.from_row(row))
        return claimed

    def heartbeat(self, owner: str, job_ids: Sequence[str]) -> dict[str, str]:
        """Mark ``owner``'s running jobs alive; returns each job's status (cancelled ones stop)."""
        if not job_ids:
            return {}
        with self._write() as s:
            s.execute(
                update(JobRow)
                .where(JobRow.id.in_(job_ids), JobRow.owner == owner, JobRow.status == "running")
                .values(heartbeat_at=utcnow())
            )
            rows = s.execute(select(JobRow.id, JobRow.status, JobRow.owner).where(JobRow.id.in_(job_ids))).all()
        return {job_id: (status if job_owner == owner else "taken") for job_id, status, job_owner in rows}

    def recover_stale(self, stale_after_s: float, max_attempts: int) -> list[tuple[str, str]]:
        """Running jobs whose owner stopped sending heartbeats: queued again, or failed when out of attempts."""
        cutoff = utcnow() - timedelta(seconds=stale_after_s)
        changed = []
        with self._write() as s:
            stale = select(JobRow).where(JobRow.status == "running", JobRow.heartbeat_at < cutoff)
            rows = s.scalars(stale.with_for_update(skip_locked=True)).all()
            for row in rows:
                reason = f"the replica running it ({row.owner}) stopped answering"
                if row.attempts < max_attempts:
                    self._requeue_row(s, row, reason)
                    changed.append((row.id, "queued"))
                else:
                    self._fail_row(s, row, "replica_died", f"{reason}; gave up after {row.attempts} attempts")
                    changed.append((row.id, "failed"))
        return changed

    def _requeue_row(self, s: Session, row: JobRow, reason: str) -> None:
        row.status, row.owner, row.heartbeat_at = "queued", None, None
        self._event(s, row.id, "retry", {"status": "queued", "attempt": row.attempts, "reason": reason})

    def _fail_row(self, s: Session, row: JobRow, code: str, message: str) -> None:
        row.status, row.error_code, row.error_message = "failed", code, message
        row.finished_at, row.heartbeat_at = utcnow(), None
        self._event(s, row.id, "failed", {"status": "failed", "error": {"code": code, "message": message}})

    def requeue_job(self, job_id: str, owner: str, reason: str, max_attempts: int) -> str:
        """After a failed attempt of ``owner``: queued again if attempts remain, else failed. Returns the status."""
        with self._write() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None or row.status != "running" or row.owner != owner:
                return "gone" if row is None else row.status
            if row.attempts < max_attempts:
                self._requeue_row(s, row, reason)
            else:
                self._fail_row(s, row, "replica_died", f"{reason}; gave up after {row.attempts} attempts")
            return row.status

    def release_job(self, job_id: str, owner: str) -> bool:
        """Give a running job back (its owner is shutting down): queued again, the attempt not counted."""
        with self._write() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None or row.status != "running" or row.owner != owner:
                return False
            row.status, row.owner, row.heartbeat_at = "queued", None, None
            row.attempts = max(0, row.attempts - 1)
            reason = "the ingress replica running it shut down (this attempt is not counted)"
            self._event(s, job_id, "retry", {"status": "queued", "attempt": row.attempts, "reason": reason})
            return True

    def fail_job(self, job_id: str, owner: str | None, code: str, message: str) -> bool:
        with self._write() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None or row.status not in ACTIVE or (owner is not None and row.owner != owner):
                return False
            self._fail_row(s, row, code, message)
            return True

    def finish_job(self, job_id: str, owner: str, result: dict[str, Any]) -> bool:
        """Store a job's result; False when it was cancelled or taken over meanwhile (result dropped)."""
        with self._write() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None or row.status != "running" or row.owner != owner:
                return False
            row.status, row.result, row.finished_at, row.heartbeat_at = "done", result, utcnow(), None
            row.progress = {**(row.progress or {}), "images_done": row.progress.get("images_total", 0)}
            self._event(s, job_id, "done", {"status": "done", "images": len(result.get("images", []))})
            return True

    def cancel_job(self, job_id: str) -> Job | None:
        with self._write() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                return None
            if row.status in ACTIVE:
                row.status, row.finished_at, row.heartbeat_at = "cancelled", utcnow(), None
                self._event(s, job_id, "cancelled", {"status": "cancelled"})
            return Job.from_row(row)

    def job_progress(self, job_id: str, owner: str, data: dict[str, Any], progress: dict[str, Any]) -> None:
        with self._write() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None or row.status != "running" or row.owner != owner:
                return
            row.progress = {**(row.progress or {}), **progress}
            self._event(s, job_id, "progress", data)

    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        with self._write() as s:
            self._event(s, job_id, kind, data)

    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[JobEvent]:
        with self._read() as s:
            rows = s.scalars(
                select(JobEventRow)
                .where(JobEventRow.job_id == job_id, JobEventRow.id > after)
                .order_by(JobEventRow.id)
                .limit(limit)
            )
            return [_event_from_row(r) for r in rows]

    def expire_jobs(self, ttl_s: float) -> int:
        """Delete finished jobs older than ``ttl_s`` and their images."""
        cutoff = utcnow() - timedelta(seconds=ttl_s)
        with self._write() as s:
            rows = s.scalars(select(JobRow).where(JobRow.status.in_(TERMINAL), JobRow.finished_at < cutoff)).all()
            digests = {img["digest"] for r in rows for img in (r.result or {}).get("images", []) if img.get("digest")}
            ids = [r.id for r in rows]
            if ids:
                s.execute(delete(JobEventRow).where(JobEventRow.job_id.in_(ids)))
                s.execute(delete(JobRow).where(JobRow.id.in_(ids)))
            # a character's recent renders hold prompts: kept no longer than jobs are
            s.execute(delete(CharacterRenderRow).where(CharacterRenderRow.created_at < cutoff))
        self._delete_unreferenced_results(digests)
        return len(ids)

    def discard_result(self, result: dict[str, Any]) -> int:
        """Delete the PNGs a job stored for a result that was dropped (the job was cancelled or purged)."""
        return self._delete_unreferenced_results(
            {img["digest"] for img in result.get("images", []) if img.get("digest")}
        )

    def _delete_unreferenced_results(self, digests: set[str]) -> int:
        """Delete the result blobs among ``digests`` that no remaining job names; returns how many."""
        if not digests:
            return 0
        with self._read() as s:
            still = {
                img.get("digest")
                for (result,) in s.execute(select(JobRow.result).where(JobRow.result.is_not(None)))
                for img in (result or {}).get("images", [])
            }
            still |= {d for (files,) in s.execute(select(EvalRunRow.files)) for d in (files or {}).values()}
        removed = 0
        for digest in digests - still:
            if self.results.exists(digest):
                self.results.delete(digest)
                removed += 1
        return removed

    # -- deleting a character ------------------------------------------------------------------
    def purge_character(self, character_id: str) -> dict[str, int]:
        """Remove what the service kept of a deleted character; returns the counts.

        Deletes every job that rendered it (rows and events, whatever their status: a running
        one fails its ``finish_job`` and its result is dropped) and those jobs' result PNGs unless
        another remaining job names the same bytes; redacts its audit rows (the character's id
        and version cleared, ``redacted_at`` set; the watermark tag, prompt hash, seed, preset,
        method, key, tenant and times stay: the retention policy). Then checkpoints the WAL
        (SQLite), so the deleted prompts are in neither the database file nor its log.
        """
        with self._write() as s:
            rows = s.scalars(select(JobRow).where(JobRow.character == character_id)).all()
            digests = {img["digest"] for r in rows for img in (r.result or {}).get("images", []) if img.get("digest")}
            ids = [r.id for r in rows]
            events = 0
            if ids:
                events = s.execute(delete(JobEventRow).where(JobEventRow.job_id.in_(ids))).rowcount
                s.execute(delete(JobRow).where(JobRow.id.in_(ids)))
            audits = s.execute(
                update(AuditRow)
                .where(AuditRow.character == character_id)
                .values(character=None, character_version=None, redacted_at=utcnow())
            ).rowcount
            render_rows = s.execute(delete(CharacterRenderRow).where(CharacterRenderRow.character == character_id))
            # few rows; a JSON containment query differs per database
            runs = [r for r in s.scalars(select(EvalRunRow)) if character_id in (r.characters or [])]
            if runs:
                s.execute(delete(EvalRunRow).where(EvalRunRow.id.in_([r.id for r in runs])))
            digests |= {d for r in runs for d in (r.files or {}).values()}
        results = self._delete_unreferenced_results(digests)
        self.checkpoint()
        log.info(
            "purged character %s: %d jobs, %d result images, %d audit rows redacted",
            character_id,
            len(ids),
            results,
            audits,
        )
        return {
            "jobs": len(ids),
            "events": events,
            "results": results,
            "audit_redacted": audits,
            "recent_renders": render_rows.rowcount,
            "eval_runs": len(runs),
        }

    def checkpoint(self) -> None:
        """SQLite: fold the WAL into the database file and truncate it (``imagegen.db.checkpoint_wal``)."""
        checkpoint_wal(self.engine)

    # -- audit ---------------------------------------------------------------------------------
    def add_audit(self, records: Sequence[dict[str, Any]], renders: Sequence[dict[str, Any]] = ()) -> None:
        """One audit row per delivered image; each record names its ``tenant`` (the key's).

        ``renders``: the character renders among them with their scores (``character_renders``
        rows), written in the same transaction. Rows arrive after their response (the ingress
        writes them behind, ``imagegen.serve.audit``), so in that transaction:

        - a row of a character deleted since its render (a registry tombstone at or above the
          row's version) is written redacted, and its recent-render row not at all: a render in
          flight during a deletion cannot bring the character back;
        - a row whose image id is already there is skipped: a retry after a commit whose answer
          was lost writes nothing twice.
        """
        if not records:
            return
        for record in [*records, *renders]:
            if "tenant" not in record:
                raise ValueError("every audit record names its tenant (the tenant of the key that rendered it)")
            validate_tenant_id(record["tenant"])
        now = utcnow()
        with self._write() as s:  # Core inserts, no ORM unit of work
            ids = [r["image_id"] for r in records]
            present = set(s.scalars(select(AuditRow.image_id).where(AuditRow.image_id.in_(ids))))
            deleted = _deleted_versions(s, {r["character"] for r in [*records, *renders] if r.get("character")})

            def gone(row: dict[str, Any]) -> bool:
                last = deleted.get(row.get("character"))
                return last is not None and (row.get("character_version") or 0) <= last

            audits = [
                {**r, "character": None, "character_version": None, "redacted_at": now}
                if gone(r)
                else {**r, "redacted_at": None}
                for r in records
                if r["image_id"] not in present
            ]
            if audits:
                s.execute(insert(AuditRow), [{**record, "created_at": now} for record in audits])
            kept = [r for r in renders if r["image_id"] not in present and not gone(r)]
            if kept:
                s.execute(insert(CharacterRenderRow), [{**render, "created_at": now} for render in kept])

    def recent_renders(self, character_id: str, tenant: str | None, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent renders of ``character_id`` (of ``tenant``; None: every tenant), newest first."""
        query = (
            select(CharacterRenderRow)
            .where(CharacterRenderRow.character == character_id)
            .order_by(CharacterRenderRow.created_at.desc(), CharacterRenderRow.image_id)
            .limit(limit)
        )
        if tenant is not None:
            query = query.where(CharacterRenderRow.tenant == tenant)
        with self._read() as s:
            return [_render_dict(r) for r in s.scalars(query)]

    def character_render(self, character_id: str, image_id: str) -> dict[str, Any] | None:
        """One recent render of ``character_id`` by image id (None: not recorded, or expired)."""
        with self._read() as s:
            row = s.get(CharacterRenderRow, image_id)
            return None if row is None or row.character != character_id else _render_dict(row)

    # -- evaluation runs -----------------------------------------------------------------------
    def create_eval_run(
        self, run_id: str, *, tenant: str, key_id: str, suite: str, characters: Sequence[str], spec: dict[str, Any]
    ) -> EvalRun:
        with self._write() as s:
            row = EvalRunRow(
                id=run_id,
                tenant=validate_tenant_id(tenant),
                key_id=key_id,
                suite=suite,
                status="queued",
                characters=list(characters),
                spec=spec,
                progress={},
                summary=None,
                files={},
                verdict=None,
                error_code=None,
                error_message=None,
                owner=None,
                heartbeat_at=None,
                created_at=utcnow(),
                started_at=None,
                finished_at=None,
            )
            s.add(row)
            s.flush()
            return EvalRun.from_row(row)

    def get_eval_run(self, run_id: str) -> EvalRun | None:
        with self._read() as s:
            row = s.get(EvalRunRow, run_id)
            return None if row is None else EvalRun.from_row(row)

    def list_eval_runs(self, tenant: str | None, limit: int = 50) -> list[EvalRun]:
        query = select(EvalRunRow).order_by(EvalRunRow.created_at.desc()).limit(limit)
        if tenant is not None:
            query = query.where(EvalRunRow.tenant == tenant)
        with self._read() as s:
            return [EvalRun.from_row(r) for r in s.scalars(query)]

    def eval_run_progress(self, run_id: str, owner: str, progress: dict[str, Any]) -> bool:
        """Record progress (and a heartbeat) of a run ``owner`` runs; False when it is gone (deleted)."""
        now = utcnow()
        with self._write() as s:
            row = s.get(EvalRunRow, run_id, with_for_update=True)
            if row is None or row.status not in ACTIVE:
                return False
            if row.status == "queued":
                row.status, row.owner, row.started_at = "running", owner, now
            if row.owner != owner:
                return False
            row.progress, row.heartbeat_at = {**(row.progress or {}), **progress}, now
            return True

    def finish_eval_run(
        self,
        run_id: str,
        owner: str,
        *,
        summary: dict[str, Any] | None = None,
        files: dict[str, str] | None = None,
        error: tuple[str, str] | None = None,
    ) -> bool:
        """End a run: ``done`` with its summary and files, or ``failed`` with ``error`` (code, message).

        False when it is gone (deleted meanwhile, or failed as stale): the caller deletes what it stored.
        """
        with self._write() as s:
            row = s.get(EvalRunRow, run_id, with_for_update=True)
            if row is None or row.status not in ACTIVE or (row.owner is not None and row.owner != owner):
                return False
            row.status = "failed" if error is not None else "done"
            row.finished_at, row.heartbeat_at = utcnow(), None
            row.summary, row.files = summary, dict(files or {})
            row.verdict = None if summary is None else summary.get("verdict")
            if error is not None:
                row.error_code, row.error_message = error
            return True

    def fail_stale_eval_runs(self, stale_after_s: float) -> int:
        """Runs whose runner stopped sending heartbeats (its replica died): failed, with the reason."""
        cutoff = utcnow() - timedelta(seconds=stale_after_s)
        with self._write() as s:
            never_started = and_(EvalRunRow.heartbeat_at.is_(None), EvalRunRow.created_at < cutoff)
            silent = or_(EvalRunRow.heartbeat_at < cutoff, never_started)
            rows = s.scalars(select(EvalRunRow).where(EvalRunRow.status.in_(ACTIVE), silent)).all()
            for row in rows:
                row.status, row.finished_at, row.heartbeat_at = "failed", utcnow(), None
                row.error_code = "runner_died"
                row.error_message = "the service replica running this evaluation stopped; submit it again"
            return len(rows)

    def delete_eval_run(self, run_id: str) -> bool:
        """Delete a run's row and its files; False when there was none."""
        with self._write() as s:
            row = s.get(EvalRunRow, run_id)
            if row is None:
                return False
            digests = set((row.files or {}).values())
            s.delete(row)
        self._delete_unreferenced_results(digests)
        return True

    def audit_by_tag(self, tag: int) -> list[dict[str, Any]]:
        with self._read() as s:
            rows = s.scalars(select(AuditRow).where(AuditRow.watermark_tag == tag)).all()
            return [_audit_dict(r) for r in rows]

    def audit_for_image(self, image_id: str) -> dict[str, Any] | None:
        with self._read() as s:
            row = s.get(AuditRow, image_id)
            return None if row is None else _audit_dict(row)


def _audit_dict(row: AuditRow) -> dict[str, Any]:
    return {
        "image_id": row.image_id,
        "request_id": row.request_id,
        "job_id": row.job_id,
        "key_id": row.key_id,
        "tenant": row.tenant,
        "preset": row.preset,
        "character": row.character,
        "character_version": row.character_version,
        "method": row.method,
        "prompt_sha256": row.prompt_sha256,
        "seed": row.seed,
        "watermark_tag": row.watermark_tag,
        "created_at": row.created_at.isoformat(),
        "redacted_at": row.redacted_at.isoformat() if row.redacted_at else None,
    }


def _render_dict(row: CharacterRenderRow) -> dict[str, Any]:
    return {
        "image_id": row.image_id,
        "tenant": row.tenant,
        "key_id": row.key_id,
        "character": row.character,
        "character_version": row.character_version,
        "request_id": row.request_id,
        "job_id": row.job_id,
        "image_index": row.image_index,
        "preset": row.preset,
        "method": row.method,
        "prompt": row.prompt,
        "identity_weight": row.identity_weight,
        "seed": row.seed,
        "width": row.width,
        "height": row.height,
        "similarity": row.similarity,
        "threshold": row.threshold,
        "passed": row.passed,
        "backend": row.backend,
        "created_at": row.created_at,
    }


def prompt_sha256(prompt: str, negative_prompt: str = "") -> str:
    return hashlib.sha256(f"{prompt}\x00{negative_prompt}".encode()).hexdigest()


def _deleted_versions(s: Session, characters: set[str]) -> dict[str, int]:
    """The last deleted version of each of ``characters`` that was deleted (the registry's tombstones)."""
    if not characters:
        return {}
    rows = s.execute(select(TombstoneRow.id, TombstoneRow.last_version).where(TombstoneRow.id.in_(characters)))
    return {character: version for character, version in rows}
