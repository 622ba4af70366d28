"""The job caps hold under concurrent submissions: counting the active jobs and inserting is one step.

Several ingress replicas (processes) share one database, so the per-key cap (``max_jobs_per_key``)
and the global one (``max_queued_jobs``) are checked inside the job's insert transaction
(``ServeStore.create_job``): SQLite's ``BEGIN IMMEDIATE`` write lock, PostgreSQL's advisory lock.
Here many threads over two stores (two engines, each with its own connections: two replicas'
worth) submit at the same instant against a real database file; exactly ``cap`` get in and a
refused submission leaves no row behind. PostgreSQL runs when ``IMAGEGEN_TEST_DATABASE_URL`` names
a database this test may wipe (`.ci/run` starts one).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from imagegen.serve.limits import count_active_jobs_of, job_cap_error
from imagegen.serve.store import Base, JobCapReached, JobEventRow, JobRow, ServeStore
from tests.serve.conftest import database_url


@pytest.fixture(params=["sqlite", "other"])
def stores(request, tmp_path: Path) -> Iterator[list[ServeStore]]:
    """Two stores on one empty database (a file for SQLite), as two ingress replicas would open it."""
    url = database_url(request.param, tmp_path, "the job caps")
    first = ServeStore(url, tmp_path / "results")
    Base.metadata.drop_all(first.engine)
    first.close()
    opened = [ServeStore(url, tmp_path / "results") for _ in range(2)]
    yield opened
    Base.metadata.drop_all(opened[0].engine)
    for store in opened:
        store.close()


def _race(stores: list[ServeStore], key_ids: list[str], **caps: int) -> tuple[list[str], list[JobCapReached]]:
    """One thread per entry of ``key_ids`` submits a job for that key, all released at once; (accepted, refused)."""
    barrier = threading.Barrier(len(key_ids))
    accepted: list[str] = []
    refused: list[JobCapReached] = []
    failed: list[BaseException] = []
    lock = threading.Lock()

    def submit(i: int, key_id: str) -> None:
        store = stores[i % len(stores)]
        job_id = uuid.uuid4().hex
        barrier.wait()
        try:
            store.create_job(
                job_id, key_id, "tiny-flux", {"prompt": f"race {i}"}, 1, tenant="default", character=None, **caps
            )
        except JobCapReached as exc:
            with lock:
                refused.append(exc)
        except BaseException as exc:  # noqa: BLE001 - reported below, with the others
            with lock:
                failed.append(exc)
        else:
            with lock:
                accepted.append(job_id)

    threads = [threading.Thread(target=submit, args=(i, key_id)) for i, key_id in enumerate(key_ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a submission hung"
    assert not failed, failed
    return accepted, refused


def _rows(store: ServeStore) -> tuple[int, int]:
    """(job rows, job event rows) in the database."""
    with store._read() as s:
        jobs = s.execute(select(func.count()).select_from(JobRow)).scalar_one()
        events = s.execute(select(func.count()).select_from(JobEventRow)).scalar_one()
    return int(jobs), int(events)


def test_concurrent_submissions_never_pass_the_key_cap(stores):
    cap = 5
    accepted, refused = _race(stores, ["key-1"] * 32, key_cap=cap, total_cap=1000)
    assert len(accepted) == cap, f"{len(accepted)} jobs accepted, the key's cap is {cap}"
    assert len(refused) == 32 - cap
    assert {(r.scope, r.limit) for r in refused} == {("key", cap)}
    assert all(r.active == cap for r in refused)
    assert count_active_jobs_of(stores[0], "key-1") == cap
    # a refused submission wrote nothing: one row and one `queued` event per accepted job
    assert _rows(stores[1]) == (cap, cap)
    # the 429 the API answers with
    error = job_cap_error(refused[0], 1)
    assert (error.status, error.code, error.headers) == (429, "too_many_jobs", {"Retry-After": "1"})
    assert error.message == f"this key has {cap} jobs queued or running (limit {cap}); retry when one ends"


def test_concurrent_submissions_never_pass_the_total_cap(stores):
    cap = 7
    keys = [f"key-{i % 4}" for i in range(36)]
    accepted, refused = _race(stores, keys, key_cap=64, total_cap=cap)
    assert len(accepted) == cap, f"{len(accepted)} jobs accepted, the queue's cap is {cap}"
    assert {(r.scope, r.active, r.limit) for r in refused} == {("total", cap, cap)}
    assert stores[0].count_active_jobs() == cap
    assert _rows(stores[0]) == (cap, cap)
    error = job_cap_error(refused[0], 2)
    assert (error.status, error.code, error.headers["Retry-After"]) == (429, "job_queue_full", "2")


def test_one_key_at_its_cap_does_not_block_another(stores):
    accepted, refused = _race(stores, ["busy"] * 12 + ["calm"] * 3, key_cap=3, total_cap=100)
    assert len(accepted) == 6 and len(refused) == 9
    assert count_active_jobs_of(stores[0], "busy") == 3
    assert count_active_jobs_of(stores[0], "calm") == 3


def test_an_ended_job_frees_its_slot(stores):
    store = stores[0]
    first = store.create_job(uuid.uuid4().hex, "key-1", "tiny-flux", {}, 1, tenant="default", character=None, key_cap=1)
    with pytest.raises(JobCapReached):
        store.create_job(uuid.uuid4().hex, "key-1", "tiny-flux", {}, 1, tenant="default", character=None, key_cap=1)
    store.cancel_job(first.id)
    again = stores[1].create_job(
        uuid.uuid4().hex, "key-1", "tiny-flux", {}, 1, tenant="default", character=None, key_cap=1
    )
    assert again.status == "queued"
    # no cap given (an internal insert): not counted at all
    store.create_job(uuid.uuid4().hex, "key-1", "tiny-flux", {}, 1, tenant="default", character=None)
    assert count_active_jobs_of(store, "key-1") == 2


def test_concurrent_design_steps_never_pass_the_key_cap(isolated_home):
    """``/v1/designs`` steps go through the same capped insert; a refused describe leaves no design behind."""
    import asyncio

    from imagegen.identity.registry import Registry
    from imagegen.serve.config import IngressConfig
    from imagegen.serve.designs import DesignService
    from imagegen.serve.errors import ApiError
    from imagegen.serve.metrics import Metrics
    from imagegen.serve.tenancy import Caller

    registry, store = Registry.open(), ServeStore.open()
    metrics = Metrics()
    designs = DesignService(
        registry,
        store,
        renderers=None,  # type: ignore[arg-type] - nothing renders here: the jobs stay queued
        presets=["tiny-flux"],
        metrics=metrics,
        config=lambda: IngressConfig(max_queued_jobs=100, retry_after_s=1),
        wake_jobs=lambda: None,
        cancel_local=lambda job_id: None,
    )
    caller = Caller(key_id="designer", tenant="default", scopes=("characters:write",))

    async def scenario() -> list:
        steps = [
            designs.create(caller, {"character_id": f"hero-{i}", "name": f"Hero {i}", "candidates": 1}, f"r{i}", 2)
            for i in range(8)
        ]
        return await asyncio.gather(*steps, return_exceptions=True)

    try:
        outcomes = asyncio.run(scenario())
        made = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, ApiError)]
        assert len(made) == 2 and len(refused) == 6, outcomes
        assert {(e.status, e.code) for e in refused} == {(429, "too_many_jobs")}
        assert count_active_jobs_of(store, "designer") == 2
        assert {d.id for d in designs.designs.list(None)} == {d.id for d in made}
        assert metrics.rejected.labels("too_many_jobs")._value.get() == 6
    finally:
        designs.pool.shutdown()
        designs.designs.close()
        store.close()
        registry.close()
