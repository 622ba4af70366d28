"""Schema migrations: a database written before this code is refused, upgraded, and equals a fresh one.

``tests/fixtures/pre_tenancy/registry.sql`` is a home's ``registry.db`` written by the code before
migrations existed (see its README). Real SQLite files, the real ``imagegen`` command; PostgreSQL
too when ``IMAGEGEN_TEST_DATABASE_URL`` names a database these tests may wipe (`.ci/run` starts one).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, inspect, select, text

from imagegen.identity.design.store import Base as DesignBase
from imagegen.identity.design.store import DesignStore
from imagegen.identity.registry import Registry
from imagegen.identity.registry.schema import Base as RegistryBase
from imagegen.migrations import (
    BASELINE,
    KNOWN_TABLES,
    SchemaOutdatedError,
    SchemaTooNewError,
    downgrade,
    head,
    upgrade,
)
from imagegen.serve.store import Base as ServeBase
from imagegen.serve.store import ServeStore
from imagegen.settings import get_settings

FIXTURE = Path(__file__).parent / "fixtures" / "pre_tenancy" / "registry.sql"
OTHER_DATABASE = os.environ.get("IMAGEGEN_TEST_DATABASE_URL", "")
KEY_ID = "1f8ce8a7d3d1"
JOB_ID = "a" * 32
IMAGE_ID = "c" * 32


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imagegen.cli", *args], capture_output=True, text=True, env=dict(os.environ), timeout=300
    )


def head_metadata() -> MetaData:
    """The registry's, the service store's and the design store's tables in one ``MetaData``: the schema at head."""
    merged = MetaData()
    for metadata in (RegistryBase.metadata, ServeBase.metadata, DesignBase.metadata):
        for table in metadata.tables.values():
            table.to_metadata(merged)
    return merged


def diff_from_models(url: str) -> list[Any]:
    """Alembic autogenerate's differences between the database at ``url`` and the models (empty: equal)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return compare_metadata(context, head_metadata())
    finally:
        engine.dispose()


def schema_of(url: str) -> dict[str, Any]:
    """Every table's columns, keys, constraints and indexes as reflected (column order ignored)."""
    engine = create_engine(url)
    try:
        found = inspect(engine)
        schema = {}
        for table in sorted(set(found.get_table_names()) - {"alembic_version"}):
            schema[table] = {
                "columns": {
                    c["name"]: (str(c["type"]), c["nullable"], str(c.get("default"))) for c in found.get_columns(table)
                },
                "primary_key": found.get_pk_constraint(table)["constrained_columns"],
                "foreign_keys": sorted(
                    (tuple(fk["constrained_columns"]), fk["referred_table"], str(fk.get("options")))
                    for fk in found.get_foreign_keys(table)
                ),
                "unique": sorted(tuple(u["column_names"]) for u in found.get_unique_constraints(table)),
                "indexes": sorted(
                    (i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in found.get_indexes(table)
                ),
            }
        return schema
    finally:
        engine.dispose()


def load_fixture(path: Path) -> str:
    conn = sqlite3.connect(path)
    conn.executescript(FIXTURE.read_text())
    conn.close()
    return f"sqlite:///{path}"


def dump_sql(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@pytest.fixture
def legacy_home(isolated_home: Path) -> Path:
    """A home whose ``registry.db`` was written before migrations (the fixture)."""
    isolated_home.mkdir(parents=True)
    load_fixture(isolated_home / "registry.db")
    return isolated_home


def check_rows_survived(registry: Registry, store: ServeStore) -> None:
    mia = registry.characters.get("mia")
    assert (mia.tenant, mia.status, mia.version, mia.report_passed) == ("default", "approved", 2, None)
    assert mia.card.extra == {"palette": ["red", "teal"], "height_cm": 168}
    assert [r.filename for r in mia.references] == ["ref_000.png"] and set(mia.references[0].faces) == {"dlib"}
    assert set(mia.centroids) == {"dlib"}
    assert registry.characters.all(tenant="default") == [mia] and registry.characters.all(tenant="acme") == []
    assert [row["method"] for row in registry.dump()["tables"]["conditioning_cache"]] == ["pulid-flux"]
    assert [p.label for p in registry.gallery.all()] == ["someone famous"]
    [key] = store.list_keys()
    # a key created before `characters:approve` existed does not gain it
    assert (key.id, key.tenant, key.scopes) == (KEY_ID, "default", ["characters:write", "render"])
    job = store.get_job(JOB_ID)
    assert (job.status, job.tenant, job.key_id, job.character) == ("done", "default", KEY_ID, "mia")
    assert job.request["body"]["prompt"] == "a pre-tenancy prompt of mia"
    assert [e.type for e in store.events(JOB_ID)] == ["queued", "started", "done"]
    audit = store.audit_for_image(IMAGE_ID)
    assert (audit["tenant"], audit["character"], audit["request_id"], audit["redacted_at"]) == (
        "default",
        "mia",
        "req-old",
        None,
    )


def test_a_database_written_before_migrations_is_refused_then_upgraded(legacy_home: Path) -> None:
    db = legacy_home / "registry.db"
    url = get_settings().registry_url
    before = dump_sql(db)
    expected = (
        f"the database at {url} is at schema {BASELINE} (written before schema migrations), "
        f"this imagegen needs {head()}: run `imagegen db upgrade`"
    )
    for opener in (Registry.open, ServeStore.open):
        with pytest.raises(SchemaOutdatedError) as info:
            opener()
        assert str(info.value) == expected and info.value.code == "schema_outdated"
    refused = run_cli("keys", "list")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [f"error: {expected}"]
    # the service refuses before it starts anything (no Ray, no port)
    serve = run_cli("serve", "--num-cpus", "1", "--port", "1")
    assert serve.returncode == 2 and serve.stderr.strip().splitlines() == [f"error: {expected}"]
    assert dump_sql(db) == before  # refusing changed nothing

    current = run_cli("db", "current")
    assert current.returncode == 0 and f"schema {BASELINE} (written before schema migrations)" in current.stdout
    upgraded = run_cli("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded from schema {BASELINE} (written before schema migrations) to {head()}" in upgraded.stdout

    with Registry.open() as registry, ServeStore.open() as store:
        assert registry.schema_revision == store.schema_revision == head()
        check_rows_survived(registry, store)
    assert diff_from_models(url) == []
    fresh = legacy_home.parent / "fresh"
    with Registry(f"sqlite:///{fresh / 'registry.db'}", fresh / "blobs"):
        pass
    with ServeStore(f"sqlite:///{fresh / 'registry.db'}", fresh / "results"):
        pass
    with DesignStore(f"sqlite:///{fresh / 'registry.db'}", fresh / "designs"):
        pass
    assert schema_of(url) == schema_of(f"sqlite:///{fresh / 'registry.db'}")
    again = run_cli("db", "upgrade")
    assert again.returncode == 0 and f"already at schema {head()}" in again.stdout
    assert "up to date" in run_cli("db", "current").stdout


def test_the_baseline_is_exactly_the_schema_before_migrations(tmp_path: Path) -> None:
    legacy = load_fixture(tmp_path / "legacy.db")
    migrated = f"sqlite:///{tmp_path / 'migrated.db'}"
    assert upgrade(migrated, BASELINE) == ("empty", BASELINE)
    assert schema_of(migrated) == schema_of(legacy)


def test_migrating_an_empty_database_gives_the_models_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    assert upgrade(url) == ("empty", head())
    assert diff_from_models(url) == []
    engine = create_engine(url)
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) == (KNOWN_TABLES - {"schema_version"}) | {"alembic_version"}
    engine.dispose()


def test_a_fresh_database_is_created_at_head_whichever_store_opens_it_first(tmp_path: Path) -> None:
    for first, second in (("store", "registry"), ("registry", "store")):
        home = tmp_path / first
        url = f"sqlite:///{home / 'registry.db'}"
        openers = {
            "store": lambda url=url, home=home: ServeStore(url, home / "results"),
            "registry": lambda url=url, home=home: Registry(url, home / "blobs"),
        }
        with openers[first]() as opened:
            assert opened.schema_revision == head()
        with openers[second]() as opened:
            assert opened.schema_revision == head()
        with DesignStore(url, home / "designs"):  # the third store: its tables join a database at head
            pass
        assert diff_from_models(url) == []


def test_a_partial_database_from_before_migrations_is_completed(tmp_path: Path) -> None:
    """A home where only `imagegen keys create` ran: the service tables, none of the registry's."""
    path = tmp_path / "keys-only.db"
    url = load_fixture(path)
    conn = sqlite3.connect(path)
    for table in ("face_analyses", "reference_images", "identity_centroids", "conditioning_cache"):
        conn.execute(f"DROP TABLE {table}")
    conn.executescript("DROP TABLE characters; DROP TABLE protected_identities; DROP TABLE schema_version;")
    conn.close()
    with pytest.raises(SchemaOutdatedError):
        ServeStore(url, tmp_path / "results")
    assert upgrade(url)[1] == head()
    assert diff_from_models(url) == []
    with ServeStore(url, tmp_path / "results") as store:
        assert [k.id for k in store.list_keys()] == [KEY_ID]


def test_downgrade_to_the_baseline_and_up_again_keeps_the_rows(tmp_path: Path) -> None:
    legacy = load_fixture(tmp_path / "legacy.db")
    path = tmp_path / "registry.db"
    url = load_fixture(path)
    upgrade(url)
    assert downgrade(url, BASELINE) == (head(), BASELINE)
    assert schema_of(url) == schema_of(legacy)
    assert upgrade(url) == (BASELINE, head())
    assert diff_from_models(url) == []
    with Registry(url, tmp_path / "blobs") as registry, ServeStore(url, tmp_path / "results") as store:
        check_rows_survived(registry, store)


def test_a_newer_schema_is_refused_in_one_line(isolated_home: Path) -> None:
    with Registry.open():
        pass
    url = get_settings().registry_url
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    engine.dispose()
    for call in (Registry.open, ServeStore.open, lambda: upgrade(url)):
        with pytest.raises(SchemaTooNewError, match="at schema 0099_from_the_future, newer than this imagegen") as info:
            call()
        assert "\n" not in str(info.value) and info.value.code == "schema_too_new"
    current = run_cli("db", "current")
    assert current.returncode == 0 and "newer than this imagegen" in current.stdout


# -- PostgreSQL ------------------------------------------------------------------------------------
def wipe(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        metadata = MetaData()
        metadata.reflect(conn)
        metadata.drop_all(conn)
    engine.dispose()


def copy_rows(source: str, target: str) -> None:
    """Every row of the SQLite ``source`` into the same tables of ``target`` (parents first)."""
    src, dst = create_engine(source), create_engine(target)
    try:
        from_tables, to_tables = MetaData(), MetaData()
        from_tables.reflect(src)
        to_tables.reflect(dst)
        with src.connect() as read, dst.begin() as write:
            for table in to_tables.sorted_tables:
                if table.name == "alembic_version":
                    continue
                rows = [dict(row._mapping) for row in read.execute(select(from_tables.tables[table.name]))]
                if rows:
                    write.execute(table.insert(), rows)
            for table in ("reference_images", "protected_identities", "serve_job_events"):
                write.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 100)"))
    finally:
        src.dispose()
        dst.dispose()


def test_a_database_before_migrations_upgrades_on_postgresql(tmp_path: Path) -> None:
    if not OTHER_DATABASE:
        pytest.skip("set IMAGEGEN_TEST_DATABASE_URL to run the migrations on PostgreSQL")
    url = OTHER_DATABASE
    wipe(url)
    try:
        upgrade(url, BASELINE)
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))  # as the code before migrations left it
        engine.dispose()
        copy_rows(load_fixture(tmp_path / "legacy.db"), url)
        with pytest.raises(SchemaOutdatedError, match="written before schema migrations"):
            Registry(url, tmp_path / "blobs")
        assert upgrade(url) == (f"{BASELINE} (written before schema migrations)", head())
        assert diff_from_models(url) == []
        with Registry(url, tmp_path / "blobs") as registry, ServeStore(url, tmp_path / "results") as store:
            check_rows_survived(registry, store)
        assert downgrade(url, BASELINE)[1] == BASELINE
        assert upgrade(url) == (BASELINE, head())
        assert diff_from_models(url) == []
    finally:
        wipe(url)
