"""A job's SSE text, read from a real service store (SQLite): it always ends by saying how the job ended.

The race it guards against was seen in CI: the stream read no new events, the job finished, and
the stream then read the job's status as ``done`` and closed without ever sending ``done``.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from imagegen.blobstore import BlobStore
from imagegen.client import parse_sse
from imagegen.serve.job_events import job_event_lines
from imagegen.serve.store import ServeStore


def _running_job(tmp_path: Path) -> tuple[ServeStore, str]:
    store = ServeStore(f"sqlite:///{tmp_path / 'serve.db'}", BlobStore.open(area="serve/results"))
    job_id = uuid.uuid4().hex
    store.create_job(job_id, "key-1", "tiny-flux", {"prompt": "p"}, total=1, tenant="default", character=None)
    [claimed] = store.claim_jobs("ingress-a", limit=1, max_attempts=2)
    assert claimed.id == job_id
    return store, job_id


def _events(store: ServeStore, job_id: str, last: int, db, lifetime_s: float = 30.0) -> list:
    async def collect() -> list[str]:
        async def no_wait() -> None:
            await asyncio.sleep(0.01)

        lines = job_event_lines(
            store, db, job_id, last, lifetime_s=lifetime_s, keepalive_s=60.0, wait_for_change=no_wait
        )
        return [text async for text in lines]

    text = "".join(asyncio.run(asyncio.wait_for(collect(), timeout=30)))
    return list(parse_sse(iter(text.split("\n"))))


def test_a_job_that_ends_between_the_two_reads_still_sends_its_done_event(isolated_home, tmp_path: Path):
    store, job_id = _running_job(tmp_path)
    seen = [e.id for e in store.events(job_id)]

    async def db(fn, *args):
        if fn == store.get_job:  # the job finishes just after the stream found no new event
            store.finish_job(job_id, "ingress-a", {"images": []})
        return fn(*args)

    events = _events(store, job_id, max(seen), db)
    assert [e.type for e in events] == ["done"], events
    assert events[0].data["job_id"] == job_id and events[0].id > max(seen)
    store.close()


def test_a_quiet_stream_ends_with_reconnect_and_resumes_where_it_stopped(isolated_home, tmp_path: Path):
    store, job_id = _running_job(tmp_path)

    async def db(fn, *args):
        return fn(*args)

    first = _events(store, job_id, 0, db, lifetime_s=0.05)
    assert [e.type for e in first] == ["queued", "started", "reconnect"], first
    resume_from = first[-1].data["last_event_id"]
    assert resume_from == first[1].id
    store.job_progress(job_id, "ingress-a", {"step": 1, "steps": 2}, {"images_done": 0})
    store.finish_job(job_id, "ingress-a", {"images": []})
    rest = _events(store, job_id, resume_from, db)
    assert [e.type for e in rest] == ["progress", "done"], rest  # nothing repeated, nothing lost
    store.close()
