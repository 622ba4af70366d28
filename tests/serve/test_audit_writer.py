"""The write-behind audit trail (``imagegen.serve.audit``) against a real SQLite service store: rows are
written after the caller moves on, in order; a flush is read-your-writes; a refusing database keeps
the rows and retries; a full queue makes the caller wait; a stop writes what is queued."""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imagegen.blobstore import BlobStore
from imagegen.identity.registry import Registry
from imagegen.serve.audit import AuditWriter
from imagegen.serve.characters import CharacterService
from imagegen.serve.store import ServeStore
from imagegen.serve.tenancy import Caller

from ..identity._helpers import make_character, make_refs


@pytest.fixture
def store(tmp_path: Path):
    opened = ServeStore(f"sqlite:///{tmp_path / 'serve.db'}", BlobStore(tmp_path / "results"))
    yield opened
    opened.close()


@pytest.fixture
def pool():
    executor = ThreadPoolExecutor(max_workers=2)
    yield executor
    executor.shutdown()


def writer_for(store: ServeStore, pool: ThreadPoolExecutor, **options) -> AuditWriter:
    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    return AuditWriter(store.add_audit, run, **options)


def row(n: int) -> dict:
    return {
        "image_id": f"{n:032x}",
        "request_id": f"r{n}",
        "job_id": None,
        "key_id": "k1",
        "tenant": "default",
        "preset": "tiny-flux",
        "character": None,
        "character_version": None,
        "method": None,
        "prompt_sha256": "0" * 64,
        "seed": n,
        "watermark_tag": n,
    }


def test_rows_are_written_behind_and_a_flush_reads_its_writes(store, pool):
    async def scenario():
        writer = writer_for(store, pool)
        for n in range(1, 6):
            await writer.submit([row(n)])
        queued = writer.pending
        await writer.flush()
        return queued, writer.status()

    queued, status = asyncio.run(scenario())
    assert queued >= 1  # submit returned before the rows were committed
    assert status == {"pending": 0, "written": 5, "dropped": 0, "error": None}
    assert [store.audit_for_image(f"{n:032x}")["seed"] for n in range(1, 6)] == [1, 2, 3, 4, 5]


def test_the_writer_waits_for_the_response_but_a_flush_does_not_wait(store, pool):
    """A batch starts ``delay_s`` after its first row (the response leaves first, and rows arriving
    meanwhile share the commit); a reader that flushes is answered at once, not after the delay."""

    async def scenario():
        writer = writer_for(store, pool, delay_s=0.3)
        await writer.submit([row(1)])
        await asyncio.sleep(0.1)
        await writer.submit([row(2)])
        before = (writer.pending, store.audit_for_image(f"{1:032x}"))
        await asyncio.sleep(0.35)  # past the delay: both rows written together, nobody flushed
        after_delay = writer.status()
        slow = writer_for(store, pool, delay_s=60)
        await slow.submit([row(3)])
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(slow.flush(), 30)
        return before, after_delay, loop.time() - started, slow.status()

    (pending, first), after_delay, flush_s, slow = asyncio.run(scenario())
    assert pending == 2 and first is None  # 0.1 s after the first row, nothing written yet
    assert after_delay == {"pending": 0, "written": 2, "dropped": 0, "error": None}
    assert flush_s < 10 and slow == {"pending": 0, "written": 1, "dropped": 0, "error": None}
    assert store.audit_for_image(f"{3:032x}") is not None


def test_a_refusing_database_keeps_the_rows_and_retries(store, pool, tmp_path):
    """The audit table is renamed away (every insert fails), then put back: nothing is lost."""
    database = sqlite3.connect(tmp_path / "serve.db")

    async def scenario():
        writer = writer_for(store, pool, retry_s=0.05)
        database.execute("ALTER TABLE render_audit RENAME TO render_audit_away")
        await writer.submit([row(1), row(2)])
        for _ in range(200):
            await asyncio.sleep(0.02)
            if writer.error:
                break
        failing = writer.status()
        await writer.submit([row(3)])  # more renders while the database refuses: queued, the caller moves on
        database.execute("ALTER TABLE render_audit_away RENAME TO render_audit")
        await asyncio.wait_for(writer.flush(), 30)
        return failing, writer.status()

    try:
        failing, after = asyncio.run(scenario())
    finally:
        database.close()
    assert failing["error"] == "OperationalError" and failing["pending"] == 2 and failing["written"] == 0
    assert after == {"pending": 0, "written": 3, "dropped": 0, "error": None}
    assert [store.audit_for_image(f"{n:032x}")["seed"] for n in (1, 2, 3)] == [1, 2, 3]


def test_a_row_the_database_refuses_does_not_hold_back_the_others(store, pool):
    """A batch refused for what one row holds is written row by row: the others land, that one is
    dropped and counted (and logged), and the writer goes on."""
    bad = {**row(2), "tenant": "../not-a-tenant"}

    async def scenario():
        writer = writer_for(store, pool)
        await writer.submit([row(1), bad, row(3)])
        await asyncio.wait_for(writer.flush(), 30)
        await writer.submit([row(4)])
        await asyncio.wait_for(writer.flush(), 30)
        return writer.status()

    assert asyncio.run(scenario()) == {"pending": 0, "written": 3, "dropped": 1, "error": None}
    assert [store.audit_for_image(f"{n:032x}") is not None for n in (1, 2, 3, 4)] == [True, False, True, True]


def test_a_full_queue_makes_the_caller_wait(store, pool):
    async def scenario():
        writer = writer_for(store, pool, max_pending=2)
        await writer.submit([row(1), row(2), row(3)])  # past the bound: returns once written
        return writer.status()

    assert asyncio.run(scenario()) == {"pending": 0, "written": 3, "dropped": 0, "error": None}
    assert store.audit_for_image(f"{3:032x}") is not None


def test_close_writes_what_is_queued(store, pool):
    async def queue_then_stop():
        writer = writer_for(store, pool)
        await writer.submit([row(7)])  # the drain task has not run yet: nothing awaited since
        queued = (writer.pending, store.audit_for_image(f"{7:032x}"))
        writer.close()  # the ingress's destructor on a graceful stop: blocking, before the loop goes
        return queued, writer.pending

    (pending, before), after = asyncio.run(queue_then_stop())
    assert pending == 1 and before is None and after == 0
    assert store.audit_for_image(f"{7:032x}")["seed"] == 7


def test_a_delete_counts_the_rows_still_queued_for_renders_it_answered(isolated_home, pool):
    """A render answered just before its character's deletion has its audit row still queued (the
    writer waits ``delay_s``): the delete writes it before the tombstone, so the purge redacts it and
    the report counts it — the count a user reads is every render of the character, not a race."""

    async def scenario(registry: Registry, store: ServeStore):
        async def db(fn, *args):
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

        writer = writer_for(store, pool, delay_s=60)  # nothing is written unless someone flushes
        version = registry.characters.get("mia").version
        await writer.submit([{**row(9), "character": "mia", "character_version": version, "method": "pulid-flux"}])
        queued = writer.pending
        service = CharacterService(registry, store, db, writer)
        caller = Caller(key_id="k1", tenant="default", scopes=("characters:write",))
        _, purged = await service.delete(caller, "mia")
        return queued, purged, writer.status()

    with Registry.open() as registry:
        registry.characters.register(make_character("mia"), make_refs(1))
        with ServeStore.open() as store:
            queued, purged, status = asyncio.run(scenario(registry, store))
            record = store.audit_for_image(f"{9:032x}")
    assert queued == 1 and status["pending"] == 0
    assert purged["audit_redacted"] == 1
    assert record["character"] is None and record["redacted_at"] is not None and record["watermark_tag"] == 9
