"""The service store (keys, durable jobs, audit) on SQLite and, when one is configured, PostgreSQL.

Job images run on both storage arms: a directory, and a bucket of the session's S3-compatible
server (``tests/storage/s3.py``). PostgreSQL runs when ``IMAGEGEN_TEST_DATABASE_URL`` names a
database this test may wipe (`.ci/run` starts one); on it, concurrent claims must not hand one
job to two ingress replicas. Purging a deleted character's jobs and audit rows runs on both; on
SQLite the file's raw bytes are checked.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session

from imagegen.blobstore import BlobStore
from imagegen.db import utcnow
from imagegen.errors import ImagegenError
from imagegen.identity.registry.schema import TombstoneRow
from imagegen.serve.auth import KeyVerifier, create_key, revoke_key
from imagegen.serve.store import Base, ServeStore

from ..storage.s3 import Bucket
from .conftest import database_url


@pytest.fixture(params=["sqlite", "other"])
def store(request, tmp_path: Path, storage: Bucket | None):
    """The service store on each database, its job images on each storage arm (a directory, a bucket)."""
    url = database_url(request.param, tmp_path, "the service store")
    opened = ServeStore(url, BlobStore.open(area="serve/results"))
    Base.metadata.drop_all(opened.engine)
    opened.close()
    opened = ServeStore(url, BlobStore.open(area="serve/results"))
    yield opened
    Base.metadata.drop_all(opened.engine)
    opened.close()


def _queue(store: ServeStore, count: int, character: str | None = None, tenant: str = "default") -> list[str]:
    ids = []
    for i in range(count):
        job_id = uuid.uuid4().hex
        store.create_job(job_id, "key-1", "tiny-flux", {"prompt": f"p{i}"}, total=1, tenant=tenant, character=character)
        ids.append(job_id)
    return ids


def _audit(image_id: str, job_id: str | None, character: str | None, tag: int, **extra) -> dict:
    return {
        "image_id": image_id,
        "request_id": "r",
        "job_id": job_id,
        "key_id": "key-1",
        "tenant": "default",
        "preset": "tiny-flux",
        "character": character,
        "character_version": None if character is None else 3,
        "method": None if character is None else "pulid-flux",
        "prompt_sha256": "0" * 64,
        "seed": 1,
        "watermark_tag": tag,
        **extra,
    }


def _render(image_id: str, character: str, prompt: str) -> dict:
    """A ``character_renders`` row: a served image of ``character`` with its score."""
    return {
        "image_id": image_id,
        "tenant": "default",
        "key_id": "key-1",
        "character": character,
        "character_version": 3,
        "request_id": "r",
        "job_id": None,
        "image_index": 0,
        "preset": "tiny-flux",
        "method": "pulid-flux",
        "prompt": prompt,
        "identity_weight": 1.0,
        "seed": 1,
        "width": 64,
        "height": 64,
        "similarity": 0.61,
        "threshold": 0.5,
        "passed": True,
        "backend": "dlib",
    }


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
    long_request_id = "eval-" + "x" * 120  # offline evaluation ids are longer than a uuid
    store.add_audit([_audit("ab" * 16, job_id, None, 0xABABABAB, request_id=long_request_id)])
    audit = store.audit_for_image("ab" * 16)
    assert (audit["seed"], audit["tenant"], audit["request_id"]) == (1, "default", long_request_id)
    assert len(store.audit_by_tag(0xABABABAB)) == 1
    with pytest.raises(ImagegenError, match="tenant"):
        store.add_audit([_audit("cd" * 16, job_id, None, 1, tenant="Not A Tenant")])
    assert store.audit_for_image("cd" * 16) is None


def test_jobs_and_keys_carry_their_tenant(store: ServeStore):
    record, _ = create_key(store, "acme-bot", ["render"], tenant="acme")
    assert (record.tenant, store.get_key(record.id).tenant) == ("acme", "acme")
    assert create_key(store, "default-bot", ["render"])[0].tenant == "default"
    [job_id] = _queue(store, 1, character="mia", tenant="acme")
    job = store.get_job(job_id)
    assert (job.tenant, job.character) == ("acme", "mia")
    with pytest.raises(ImagegenError, match="not a valid tenant id"):
        store.create_job(uuid.uuid4().hex, "key-1", "tiny-flux", {}, 1, tenant="../acme", character=None)
    with pytest.raises(ImagegenError, match="not a valid tenant id"):
        create_key(store, "bad", ["render"], tenant="ACME")
    assert len(store.list_keys()) == 2 and len(store.list_jobs(None)) == 1


def test_purging_a_character_removes_its_jobs_and_redacts_its_audit(
    store: ServeStore, tmp_path: Path, storage: Bucket | None
):
    prompt = "zqxprompt-a-secret-scene-of-the-deleted-face"
    doomed = _queue(store, 2, character="zqxchar")
    [other] = _queue(store, 1, character="noa")
    [plain] = _queue(store, 1)
    # the first doomed job's PNG, one PNG shared with noa's job (same bytes), noa's own PNG
    own, shared, kept = (store.results.put(f"png-{name}".encode()) for name in ("own", "shared", "kept"))
    results = {doomed[0]: [own, shared], doomed[1]: [], other: [shared, kept], plain: []}
    for job in store.claim_jobs("ingress-a", limit=4, max_attempts=2):
        said = prompt if job.id in doomed else "another prompt"
        store.job_progress(job.id, "ingress-a", {"step": 1, "prompt": said}, {"images_done": 0})
        if job.id != doomed[1]:  # the second doomed job is still running when the character goes
            images = [{"index": i, "digest": d} for i, d in enumerate(results[job.id])]
            assert store.finish_job(job.id, "ingress-a", {"images": images, "prompt": said})
    store.add_audit(
        [
            _audit("a1" * 16, doomed[0], "zqxchar", 0xA1A1A1A1),
            _audit("a2" * 16, None, "zqxchar", 0xA2A2A2A2),
            _audit("b1" * 16, other, "noa", 0xB1B1B1B1),
        ]
    )
    # a recent render of each (its prompt kept, unlike the audit row's hash) and API evaluation runs
    store.add_audit(
        [_audit("a3" * 16, None, "zqxchar", 0xA3A3A3A3), _audit("b3" * 16, None, "noa", 0xB3B3B3B3)],
        [_render("a3" * 16, "zqxchar", prompt), _render("b3" * 16, "noa", "noa at the beach")],
    )
    assert [r["prompt"] for r in store.recent_renders("zqxchar", "default")] == [prompt]
    assert store.recent_renders("zqxchar", "another-tenant") == []
    report = store.results.put(b"<html>the zqxchar report</html>")
    for run_id, characters in (("e" * 32, ["zqxchar", "noa"]), ("f" * 32, ["noa"])):
        store.create_eval_run(run_id, tenant="default", key_id="key-1", suite="s", characters=characters, spec={})
        assert store.eval_run_progress(run_id, "ingress-a", {"phase": "render"})
    assert store.finish_eval_run("e" * 32, "ingress-a", summary={"verdict": "pass"}, files={"report.html": report})
    assert store.get_eval_run("e" * 32).verdict == "pass"

    counts = store.purge_character("zqxchar")

    assert counts == {
        "jobs": 2,
        "events": 7,
        "results": 2,
        "audit_redacted": 3,
        "recent_renders": 1,
        "eval_runs": 1,
    }
    assert store.recent_renders("zqxchar", None) == [] and len(store.recent_renders("noa", None)) == 1
    assert store.get_eval_run("e" * 32) is None and store.get_eval_run("f" * 32).status == "running"
    assert not store.results.exists(report)
    assert [store.get_job(j) for j in doomed] == [None, None] and store.events(doomed[0]) == []
    assert not store.finish_job(doomed[1], "ingress-a", {"images": []})  # the running one's result is dropped
    assert not store.results.exists(own) and store.results.exists(shared) and store.results.exists(kept)
    if storage is not None:  # purged from the bucket itself, as boto3 lists it
        assert [key.rsplit("/", 1)[1] for key in storage.keys()] == sorted([shared, kept])
    assert store.get_job(other).status == "done" and store.get_job(plain).status == "done"
    redacted = store.audit_by_tag(0xA1A1A1A1)
    assert len(redacted) == 1
    row = redacted[0]
    assert (row["character"], row["character_version"], row["image_id"], row["job_id"]) == (
        None,
        None,
        "a1" * 16,
        doomed[0],
    )
    assert row["redacted_at"] and (row["prompt_sha256"], row["seed"], row["method"]) == ("0" * 64, 1, "pulid-flux")
    assert (
        store.audit_for_image("b1" * 16)["character"] == "noa"
        and store.audit_for_image("b1" * 16)["redacted_at"] is None
    )
    assert set(store.purge_character("zqxchar").values()) == {0}
    if store.url.get_backend_name() == "sqlite":
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == 1  # freed pages are zeroed
        # not in the database file, its write-ahead log, or SQLite's free pages
        for path in tmp_path.glob("serve.db*"):
            raw = path.read_bytes()
            assert prompt.encode() not in raw and b"zqxchar" not in raw, path


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


def test_a_late_audit_row_of_a_deleted_character_is_written_redacted(store: ServeStore):
    """Audit rows arrive after their response (write-behind): a render still in flight when its
    character was deleted (registry tombstone, then purge) must not bring the character back, and a
    batch retried after a commit whose answer was lost writes nothing twice."""
    character = f"zqxlate{uuid.uuid4().hex[:8]}"
    with Session(store.engine) as s, s.begin():
        s.add(TombstoneRow(id=character, last_version=3, deleted_at=utcnow()))
    try:
        store.purge_character(character)
        late = [
            _audit("c1" * 16, None, character, 0xC1C1C1C1),  # version 3: rendered before the deletion
            _audit("c2" * 16, None, character, 0xC2C2C2C2, character_version=4),  # the id registered again
            _audit("c3" * 16, None, None, 0xC3C3C3C3),
        ]
        renders = [_render("c1" * 16, character, "zqxlate-secret-prompt")]
        store.add_audit(late, renders)
        store.add_audit(late, renders)  # the retry: no duplicate-key error, nothing written twice

        redacted = store.audit_for_image("c1" * 16)
        assert redacted["character"] is None and redacted["character_version"] is None and redacted["redacted_at"]
        assert redacted["watermark_tag"] == 0xC1C1C1C1 and len(store.audit_by_tag(0xC1C1C1C1)) == 1
        again = store.audit_for_image("c2" * 16)
        assert again["character"] == character and again["character_version"] == 4 and again["redacted_at"] is None
        assert store.audit_for_image("c3" * 16)["redacted_at"] is None
        assert store.recent_renders(character, None) == []  # the deleted character's prompt never came back
    finally:
        with Session(store.engine) as s, s.begin():
            s.execute(delete(TombstoneRow).where(TombstoneRow.id == character))
