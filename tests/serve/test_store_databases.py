"""The service store (keys, durable jobs, audit) on SQLite and, when one is configured, PostgreSQL.

PostgreSQL runs when ``IMAGEGEN_TEST_DATABASE_URL`` names a database this test may wipe (`.ci/run`
starts one); on it, concurrent claims must not hand one job to two ingress replicas.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest

from imagegen.serve.auth import KeyVerifier, create_key, revoke_key
from imagegen.serve.store import Base, ServeStore

OTHER_DATABASE = os.environ.get("IMAGEGEN_TEST_DATABASE_URL", "")


@pytest.fixture(params=["sqlite", "other"])
def store(request, tmp_path: Path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'serve.db'}"
    elif OTHER_DATABASE:
        url = OTHER_DATABASE
    else:
        pytest.skip("set IMAGEGEN_TEST_DATABASE_URL to run the service store against another database")
    opened = ServeStore(url, tmp_path / "results")
    Base.metadata.drop_all(opened.engine)
    opened.close()
    opened = ServeStore(url, tmp_path / "results")
    yield opened
    Base.metadata.drop_all(opened.engine)
    opened.close()


def _queue(store: ServeStore, count: int) -> list[str]:
    ids = []
    for i in range(count):
        job_id = uuid.uuid4().hex
        store.create_job(job_id, "key-1", "tiny-flux", {"prompt": f"p{i}"}, total=1)
        ids.append(job_id)
    return ids


def test_keys_verify_and_revoke(store: ServeStore):
    record, secret = create_key(store, "backend-a", ["render"])
    verifier = KeyVerifier(store, ttl_s=0)
    assert verifier.verify(secret).id == record.id
    assert verifier.verify(secret[:-1] + ("x" if secret[-1] != "x" else "y")) is None
    revoke_key(store, record.id)
    assert verifier.verify(secret) is None
    assert [k.id for k in store.list_keys()] == [record.id] and store.get_key(record.id).revoked_at is not None


def test_job_lifecycle_events_and_audit(store: ServeStore):
    [job_id] = _queue(store, 1)
    [claimed] = store.claim_jobs("ingress-a", limit=4, max_attempts=2)
    assert claimed.id == job_id and claimed.status == "running" and claimed.attempts == 1
    store.job_progress(job_id, "ingress-a", {"step": 1, "steps": 4}, {"images_done": 0})
    assert store.finish_job(job_id, "ingress-a", {"images": []})
    assert not store.finish_job(job_id, "ingress-b", {"images": []})  # not its owner, already done
    assert [e.type for e in store.events(job_id)] == ["queued", "started", "progress", "done"]
    assert store.get_job(job_id).status == "done" and store.job_counts() == {"done": 1}
    store.add_audit(
        [
            {
                "image_id": "ab" * 16,
                "request_id": "r",
                "job_id": job_id,
                "key_id": "key-1",
                "preset": "tiny-flux",
                "character": None,
                "character_version": None,
                "method": None,
                "prompt_sha256": "0" * 64,
                "seed": 1,
                "watermark_tag": 0xABABABAB,
            }
        ]
    )
    assert store.audit_for_image("ab" * 16)["seed"] == 1 and len(store.audit_by_tag(0xABABABAB)) == 1


def test_a_stale_job_is_retried_once_then_failed(store: ServeStore):
    [job_id] = _queue(store, 1)
    store.claim_jobs("ingress-a", limit=1, max_attempts=2)
    assert store.recover_stale(stale_after_s=-1, max_attempts=2) == [(job_id, "queued")]
    store.claim_jobs("ingress-b", limit=1, max_attempts=2)
    assert store.recover_stale(stale_after_s=-1, max_attempts=2) == [(job_id, "failed")]
    job = store.get_job(job_id)
    assert job.status == "failed" and job.attempts == 2 and job.error_code == "replica_died"


def test_concurrent_claims_never_share_a_job(store: ServeStore):
    ids = set(_queue(store, 24))
    claims: dict[str, list[str]] = {}
    barrier = threading.Barrier(4)

    def claimer(owner: str) -> None:
        barrier.wait()
        taken: list[str] = []
        for _ in range(12):
            taken += [job.id for job in store.claim_jobs(owner, limit=2, max_attempts=2)]
        claims[owner] = taken

    threads = [threading.Thread(target=claimer, args=(f"ingress-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [job_id for taken in claims.values() for job_id in taken]
    assert len(every) == len(set(every)) == len(ids), claims
    assert set(every) == ids
    assert all(store.get_job(job_id).attempts == 1 for job_id in ids)
