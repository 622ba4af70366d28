"""The registry on PostgreSQL (or any other SQLAlchemy URL): the same code, no SQLite-only SQL.

Its blobs run on both storage arms (a directory, a bucket of the session's S3-compatible server).
Skipped unless ``IMAGEGEN_TEST_DATABASE_URL`` names a database this test may wipe, e.g.
``postgresql+psycopg://postgres@/imagegen_test?host=/tmp&port=5432`` (needs a driver such as
psycopg). The schema's DDL is compiled for PostgreSQL in every run.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from imagegen.blobstore import BlobStore
from imagegen.identity.models import DuplicateCharacterError, StaleConditioningError, UnknownCharacterError
from imagegen.identity.registry import Registry
from imagegen.identity.registry.schema import Base
from imagegen.migrations import head

from ..storage.s3 import Bucket
from ._helpers import embedding, make_character, make_refs

URL = os.environ.get("IMAGEGEN_TEST_DATABASE_URL", "")


def test_schema_compiles_for_postgresql() -> None:
    dialect = postgresql.dialect()
    for table in Base.metadata.sorted_tables:
        ddl = str(CreateTable(table).compile(dialect=dialect))
        assert "CREATE TABLE" in ddl
        for index in table.indexes:
            str(CreateIndex(index).compile(dialect=dialect))


@pytest.fixture
def pg_registry(storage: Bucket | None) -> Registry:
    """The registry on the other database; its blobs in IMAGEGEN_HOME/blobs or in a bucket (``storage``)."""
    if not URL:
        pytest.skip("set IMAGEGEN_TEST_DATABASE_URL to run the registry against another database")
    reg = Registry(URL, BlobStore.open())
    Base.metadata.drop_all(reg.engine)
    reg.close()
    reg = Registry(URL, BlobStore.open())
    yield reg
    Base.metadata.drop_all(reg.engine)
    reg.close()


def test_registry_on_another_database(pg_registry: Registry) -> None:
    reg = pg_registry
    assert reg.schema_revision == head()
    stored = reg.characters.register(
        make_character("mia", tenant="acme", centroids={"dlib": embedding(1)}), make_refs(3, backends=("dlib", "x"))
    )
    assert reg.characters.all(tenant="acme") == [stored] and reg.characters.ids(tenant="default") == []
    assert reg.characters.get("mia") == stored and stored.created_at.tzinfo is not None
    with pytest.raises(DuplicateCharacterError):
        reg.characters.register(make_character("mia"), make_refs(1, start=9))
    assert reg.characters.approve("mia").version == 2
    key = ("mia", "pulid-flux", "v0.9.1", "w")
    reg.conditioning.put(*key, {"t": torch.arange(4.0)}, {"k": 1}, expected_version=2)
    assert torch.equal(reg.conditioning.get(*key)["t"], torch.arange(4.0))
    with pytest.raises(StaleConditioningError):
        reg.conditioning.put(*key, {"t": torch.ones(1)}, expected_version=1)
    replaced = reg.characters.replace_references("mia", make_refs(2, start=2))
    assert replaced.version == 3 and reg.conditioning.get(*key) is None
    reg.gallery.add("someone", "dlib", embedding(5))

    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            reg.characters.register(make_character(f"c{k}"), make_refs(2, start=100 + 10 * k))
            reg.characters.set_status(f"c{k}", "approved")
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert reg.characters.ids() == sorted(["mia"] + [f"c{k}" for k in range(6)])

    report = reg.characters.delete("mia")
    assert report.references == 2 and report.blobs_removed == 2
    with pytest.raises(UnknownCharacterError):
        reg.characters.get("mia")
    tables = reg.dump()["tables"]
    assert [(t["id"], t["last_version"]) for t in tables.pop("character_tombstones")] == [("mia", 3)]
    assert "mia" not in str(tables)
    assert reg.characters.register(make_character("mia"), make_refs(1, start=60)).version == 4
    assert reg.verify() == []
    assert reg.gc(grace_s=0).blobs_removed == 0
