"""What the two SQLAlchemy schemas (the registry and the service store) share: engine, clock, column type.

Both schemas may live in one database (SQLite in ``IMAGEGEN_HOME`` by default, or PostgreSQL); both
need the same SQLite discipline (WAL, foreign keys, explicit ``BEGIN``) and must read back the
same aware UTC datetimes whatever the backend stores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from sqlalchemy import URL, DateTime, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def create_database_engine(
    url: URL,
    *,
    echo: bool = False,
    synchronous: str = "FULL",
    secure_delete: bool = False,
    foreign_keys: bool = True,
) -> Engine:
    """An engine for ``url``; for SQLite: the file's folder created, WAL and the pragmas on every connection.

    SQLAlchemy (not sqlite3) emits ``BEGIN``: a connection with the execution option
    ``sqlite_begin="IMMEDIATE"`` takes the write lock up front (no lock-upgrade deadlock between two
    writers); reads use a plain deferred ``BEGIN`` and never block writers in WAL mode.
    ``synchronous`` trades durability of the last OS-buffered transactions for speed (never
    corruption); ``secure_delete`` overwrites deleted rows instead of leaving them in free pages.
    ``foreign_keys=False`` is for schema migrations only: SQLite cannot switch the pragma inside a
    transaction, and a migration that rebuilds a parent table must not cascade its ``DROP`` to the
    children's rows (the migration checks the keys itself before it commits).
    Raises ``ImportError`` / ``NoSuchModuleError`` when the URL's driver is not installed.
    """
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "echo": echo}
    is_sqlite = url.get_backend_name() == "sqlite"
    if is_sqlite:
        database = url.database or ""
        in_memory = database in ("", ":memory:") or url.query.get("mode") == "memory"
        kwargs["connect_args"] = {"timeout": 30}
        if in_memory:
            kwargs["connect_args"]["check_same_thread"] = False
            kwargs["poolclass"] = StaticPool
        else:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)
    if not is_sqlite:
        return engine
    pragmas = [
        f"foreign_keys={'ON' if foreign_keys else 'OFF'}",
        "journal_mode=WAL",
        f"synchronous={synchronous}",
        "busy_timeout=30000",
    ]
    if secure_delete:
        pragmas.append("secure_delete=ON")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # BEGIN is emitted below
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(f"PRAGMA {pragma}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {'IMMEDIATE' if mode == 'IMMEDIATE' else 'DEFERRED'}")

    return engine


def checkpoint_wal(engine: Engine) -> None:
    """SQLite: copy the WAL into the database and truncate it, so deleted rows leave no trace there.

    Best effort (a no-op on other databases): a reader in another process can keep the WAL busy;
    ``secure_delete`` has already zeroed the freed pages and the next checkpoint finishes the job.
    """
    if engine.url.get_backend_name() != "sqlite":
        return
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        try:
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            cursor.close()
    except Exception as exc:  # noqa: BLE001 - best effort, never fails a completed delete
        logging.getLogger(__name__).debug("WAL checkpoint after a delete failed: %s", exc)
    finally:
        raw.close()


class SessionScopes:
    """Read and write transactions over ``self.engine``, closing, and the context-manager protocol.

    The registry and the service store both derive from it: every call opens its own session, so
    both are thread-safe. Write transactions take SQLite's write lock up front (``BEGIN IMMEDIATE``).
    """

    engine: Engine

    def _open_sessions(self) -> None:
        self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(
            self.engine.execution_options(sqlite_begin="IMMEDIATE"), expire_on_commit=False
        )

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._read_sessions() as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
