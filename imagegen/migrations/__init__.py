"""Schema migrations (Alembic) of the one database the registry and the service store share.

Both schemas (``identity/registry/schema.py`` and ``serve/store.py``) live in one database
(``settings.registry_url``), so they share one Alembic history, shipped inside the package
(``imagegen/migrations/versions``): ``0001_baseline`` is the schema written before migrations
existed, every later revision one change of it. The database records its revision in Alembic's
``alembic_version`` table.

Why a store checks the revision every time it opens the database (``prepare``):

- a **fresh** database (none of our tables) is created at the head revision on the spot
  (``create_all`` of the store's tables + ``stamp head``): the demo and the tests need no command;
- a database **at head** gets the store's tables that are still missing (the registry and the
  service store may open a fresh database in either order);
- a database at an **older** revision, or one written before migrations (our tables but no
  ``alembic_version``), is refused with one line naming ``imagegen db upgrade``: code must never
  write rows into a schema it does not know;
- a revision this code does not know (written by a newer imagegen) is refused too.

``upgrade`` (``imagegen db upgrade``, or a deployment's start with ``args.migrate``: see
``imagegen.serve.app``) brings the database to head. It is safe to run from several processes or
nodes at once, so replicas of one deployment never race a migration: the step holds the schema
lock for its whole transaction (a PostgreSQL advisory lock, which every node shares; SQLite's
write lock, taken up front with ``BEGIN IMMEDIATE``). The first process migrates; the others wait,
then find the database at head and change nothing (``upgrade`` returns the same revision twice;
``tests/test_migrations_cluster.py`` races processes on both databases).

The baseline revision creates only the tables that are missing, so a database written before
migrations (all tables or only some of them) is brought to the baseline and stamped before the
later revisions run.

Writing a revision: copy the newest file in ``versions/``, set ``revision`` / ``down_revision``,
write ``upgrade`` and ``downgrade`` with ``op`` (batch mode for ALTERs SQLite lacks), change the
models the same way, and add any new table to ``KNOWN_TABLES``; ``tests/test_migrations.py``
checks that a migrated database equals a fresh one.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import MetaData, Table, inspect, text
from sqlalchemy.engine import URL, Connection, Engine, make_url

from imagegen.db import create_database_engine
from imagegen.errors import ImagegenError

__all__ = [
    "BASELINE",
    "KNOWN_TABLES",
    "LEGACY_TABLE",
    "SchemaError",
    "SchemaOutdatedError",
    "SchemaState",
    "SchemaTooNewError",
    "downgrade",
    "head",
    "prepare",
    "read_state",
    "state_of",
    "upgrade",
    "where_of",
]

#: the first revision: the schema of the code before migrations existed
BASELINE = "0001_baseline"
#: the hand-rolled version table the registry kept before migrations (dropped by ``0002_tenancy``)
LEGACY_TABLE = "schema_version"
#: every table a revision creates: a database with none of them is fresh, with some but no
#: ``alembic_version`` it was written before migrations
KNOWN_TABLES = frozenset(
    {
        LEGACY_TABLE,
        "characters",
        "reference_images",
        "face_analyses",
        "identity_centroids",
        "conditioning_cache",
        "protected_identities",
        "character_tombstones",
        "api_keys",
        "serve_jobs",
        "serve_job_events",
        "render_audit",
        "designs",
        "design_images",
        "character_renders",
        "eval_runs",
    }
)
#: PostgreSQL advisory lock taken around schema work (SQLite: the ``BEGIN IMMEDIATE`` write lock)
_LOCK_KEY = zlib.crc32(b"imagegen-schema")
_COMMAND = "imagegen db upgrade"


class SchemaError(ImagegenError):
    """The database's schema is not the one this imagegen reads and writes."""

    code = "schema_error"


class SchemaOutdatedError(SchemaError):
    """The database is at an older schema revision: ``imagegen db upgrade`` brings it to head."""

    code = "schema_outdated"


class SchemaTooNewError(SchemaError):
    """The database was migrated by a newer imagegen than this one."""

    code = "schema_too_new"


def where_of(url: URL | str) -> str:
    """A database URL as messages show it (the password hidden)."""
    return make_url(url).render_as_string(hide_password=True)


# -- the revision history ------------------------------------------------------------------------
def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    return config


@lru_cache(maxsize=1)
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The revision this code reads and writes."""
    return _scripts().get_current_head() or BASELINE


def _is_known(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


# -- the database's state ------------------------------------------------------------------------
@dataclass(frozen=True)
class SchemaState:
    """Where a database stands: its Alembic revision (None: no ``alembic_version``) and our tables."""

    revision: str | None
    tables: frozenset[str]

    @property
    def fresh(self) -> bool:
        """None of our tables and no revision: created at head on first use."""
        return self.revision is None and not self.tables

    @property
    def legacy(self) -> bool:
        """Our tables but no revision: written before migrations existed (the baseline schema)."""
        return self.revision is None and bool(self.tables)

    @property
    def at_head(self) -> bool:
        return self.revision == head()

    @property
    def known(self) -> bool:
        """Whether this code knows the revision (False: a newer imagegen migrated the database)."""
        return self.revision is None or _is_known(self.revision)

    @property
    def label(self) -> str:
        """The revision as messages show it."""
        if self.revision is not None:
            return self.revision
        return f"{BASELINE} (written before schema migrations)" if self.tables else "empty"


def read_state(conn: Connection) -> SchemaState:
    """The schema state of the database ``conn`` is connected to."""
    tables = frozenset(inspect(conn).get_table_names()) & KNOWN_TABLES
    heads = MigrationContext.configure(conn).get_current_heads()
    if len(heads) > 1:  # a branched history is never written by imagegen
        return SchemaState(revision="+".join(sorted(heads)), tables=tables)
    return SchemaState(revision=heads[0] if heads else None, tables=tables)


def state_of(url: URL | str) -> SchemaState:
    """The schema state of the database at ``url`` (for ``imagegen db current``; creates nothing)."""
    url = make_url(url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not Path(url.database).expanduser().exists():
            return SchemaState(revision=None, tables=frozenset())
    engine = create_database_engine(url)
    try:
        with engine.connect() as conn:
            return read_state(conn)
    finally:
        engine.dispose()


def _lock(conn: Connection) -> None:
    """Serialise schema work between processes (SQLite: the caller's ``BEGIN IMMEDIATE`` already does)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})


def _refusal(state: SchemaState, where: str) -> SchemaError:
    if not state.known:
        return SchemaTooNewError(
            f"the database at {where} is at schema {state.label}, newer than this imagegen knows "
            f"(it needs {head()}): upgrade imagegen, or point IMAGEGEN_HOME / IMAGEGEN_DATABASE_URL elsewhere"
        )
    return SchemaOutdatedError(
        f"the database at {where} is at schema {state.label}, this imagegen needs {head()}: run `{_COMMAND}`"
    )


# -- opening and upgrading -----------------------------------------------------------------------
def prepare(engine: Engine, metadata: MetaData, where: str, also: Sequence[Table] = ()) -> None:
    """Make ``engine``'s database ready for the tables of ``metadata``, or refuse (see the module doc).

    ``also``: tables of the other store this one reads (the service's audit writer reads the
    registry's tombstones), created too when this store is the first to open the database.
    One write transaction (``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL): two
    processes opening a fresh database at once create it once.
    """
    with engine.execution_options(sqlite_begin="IMMEDIATE").begin() as conn:
        _lock(conn)
        state = read_state(conn)
        if state.fresh or state.at_head:  # at head: this store's tables, when the other store created the database
            metadata.create_all(conn)
            for table in also:
                table.create(conn, checkfirst=True)
            if state.fresh:
                MigrationContext.configure(conn).stamp(_scripts(), "head")
        else:
            raise _refusal(state, where)


def upgrade(url: URL | str, revision: str = "head") -> tuple[str, str]:
    """Migrate the database at ``url`` to head (or ``revision``); returns (the revision it was at, now).

    Runs every revision in one transaction; on SQLite with foreign keys off (a rebuilt parent
    table must not cascade its ``DROP``) and checked with ``PRAGMA foreign_key_check`` before
    the commit. A database newer than this code is refused and left unchanged.
    """
    return _migrate(url, revision, command.upgrade)


def downgrade(url: URL | str, revision: str) -> tuple[str, str]:
    """Migrate the database at ``url`` back to ``revision`` (what later revisions added is lost)."""
    return _migrate(url, revision, command.downgrade)


def _migrate(url: URL | str, revision: str, step: Callable[[Config, str], None]) -> tuple[str, str]:
    url = make_url(url)
    where = where_of(url)
    engine = create_database_engine(url, synchronous="FULL", secure_delete=True, foreign_keys=False)
    try:
        with engine.execution_options(sqlite_begin="IMMEDIATE").begin() as conn:
            _lock(conn)
            before = read_state(conn)
            if not before.known:
                raise _refusal(before, where)
            config = _config()
            config.attributes["connection"] = conn
            step(config, revision)
            _check_foreign_keys(conn, where)
            after = read_state(conn)
        return before.label, after.label
    finally:
        engine.dispose()


def _check_foreign_keys(conn: Connection, where: str) -> None:
    if conn.dialect.name != "sqlite":
        return
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise SchemaError(
            f"migrating the database at {where} would leave {len(broken)} row(s) pointing at missing rows "
            f"(first: table {broken[0][0]}, row {broken[0][1]}); nothing was changed"
        )
