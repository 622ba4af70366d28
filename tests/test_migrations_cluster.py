"""Migrations on a cluster: several processes migrating one database at once, and the deployment's migration step.

Every replica of a deployment may start at the same moment, and two deploys may race: ``upgrade`` holds the
schema lock (an advisory lock on PostgreSQL, the write lock taken with ``BEGIN IMMEDIATE`` on SQLite), so
exactly one process migrates and the others wait, then find the schema at head. Real processes, real SQLite files, the
real pre-migrations fixture; PostgreSQL too when ``IMAGEGEN_TEST_DATABASE_URL`` is set (`.ci/run` starts one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from imagegen.identity.registry import Registry
from imagegen.migrations import BASELINE, SchemaOutdatedError, head, state_of
from imagegen.serve.app import build_app

from .test_migrations import OTHER_DATABASE, load_fixture, wipe

PROCESSES = 3
#: each child imports everything first, says "ready", waits for the word, then migrates
CHILD = """
import json, sys
from imagegen.migrations import upgrade
print("ready", flush=True)
sys.stdin.readline()
try:
    before, after = upgrade(sys.argv[1])
    print(json.dumps({"before": before, "after": after}), flush=True)
except BaseException as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    raise
"""


def migrate_at_once(url: str, processes: int = PROCESSES) -> list[dict]:
    """Start ``processes`` children, release them together, and return what each one's ``upgrade`` said."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        for _ in range(processes)
    ]
    for child in children:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
    for child in children:  # as close to simultaneous as separate processes get
        child.stdin.write("go\n")
        child.stdin.flush()
    outcomes = []
    for child in children:
        out, err = child.communicate(timeout=180)
        assert child.returncode == 0, err
        outcomes.append(json.loads(out.strip().splitlines()[-1]))
    return outcomes


def check_one_migrated(outcomes: list[dict], was: str) -> None:
    migrated = [o for o in outcomes if o["before"] != o["after"]]
    assert migrated == [{"before": was, "after": head()}], outcomes
    assert [o for o in outcomes if o not in migrated] == [{"before": head(), "after": head()}] * (len(outcomes) - 1)


def version_rows(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))]
    finally:
        engine.dispose()


def test_replicas_migrating_a_fresh_sqlite_database_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    check_one_migrated(migrate_at_once(url), "empty")
    assert version_rows(url) == [head()] and state_of(url).at_head


def test_replicas_migrating_a_database_from_before_migrations_at_once(tmp_path: Path) -> None:
    url = load_fixture(tmp_path / "registry.db")
    check_one_migrated(migrate_at_once(url), f"{BASELINE} (written before schema migrations)")
    assert version_rows(url) == [head()]
    with Registry(url, tmp_path / "blobs") as registry:  # the rows survived the one migration
        assert registry.characters.get("mia").version == 2


def test_replicas_migrating_postgresql_at_once() -> None:
    if not OTHER_DATABASE:
        pytest.skip("set IMAGEGEN_TEST_DATABASE_URL to race the migration on PostgreSQL")
    wipe(OTHER_DATABASE)
    try:
        check_one_migrated(migrate_at_once(OTHER_DATABASE), "empty")
        assert version_rows(OTHER_DATABASE) == [head()]
    finally:
        wipe(OTHER_DATABASE)


def test_the_deployment_migrates_once_when_it_is_built(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True)
    url = load_fixture(isolated_home / "registry.db")
    build_app({"presets": ["tiny-flux"], "warmup": False})  # without args.migrate: nothing changes
    with pytest.raises(SchemaOutdatedError, match="imagegen db upgrade"):
        Registry.open()
    build_app({"presets": ["tiny-flux"], "warmup": False, "migrate": True})
    assert state_of(url).at_head
    build_app({"presets": ["tiny-flux"], "warmup": False, "migrate": True})  # a redeploy: already at head
    assert version_rows(url) == [head()]
    with Registry.open() as registry:
        assert registry.characters.get("mia").version == 2
