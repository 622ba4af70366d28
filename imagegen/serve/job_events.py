"""A job's server-sent events as text, read from the database (so any ingress replica can serve them).

The stream ends at the job's terminal event (``done``, ``failed``, ``cancelled``), or after its
lifetime with a ``reconnect`` event, and sends keep-alive comments while the job is quiet.

A job ends in one transaction that sets its status and writes its terminal event. The stream reads
events first and the job's status second, so a job that ends between the two reads is seen ended
with its terminal event still unsent: the stream reads the events once more before it closes, and
never ends without telling the client how the job ended.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from imagegen.serve.service import iso
from imagegen.serve.store import TERMINAL, JobEvent, ServeStore

#: runs a blocking store call off the event loop (``RenderService.db``)
DbCall = Callable[..., Awaitable[Any]]


def sse_event(job_id: str, event: JobEvent, extra: dict[str, Any]) -> str:
    """One event in the SSE wire format: ``id`` (resumable with ``Last-Event-ID``), ``event``, JSON ``data``."""
    payload = {"job_id": job_id, **extra, **event.data, "at": iso(event.created_at)}
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(payload)}\n\n"


async def job_event_lines(
    store: ServeStore,
    db: DbCall,
    job_id: str,
    last: int,
    *,
    lifetime_s: float,
    keepalive_s: float,
    wait_for_change: Callable[[], Awaitable[None]],
    extra: dict[str, Any] | None = None,
) -> AsyncIterator[str]:
    """The SSE text of ``job_id``'s events after event id ``last``, until the job ends or ``lifetime_s`` passes.

    ``wait_for_change`` returns when a job may have a new event (or after a short poll interval);
    ``extra`` is added to every event's data (a design's id).
    """
    extra = extra or {}
    keepalive = opened = time.monotonic()
    while True:
        events = await db(store.events, job_id, last)
        ended = False
        if not events:
            current = await db(store.get_job, job_id)
            ended = current is None or current.status in TERMINAL
            if current is not None and ended:
                events = await db(store.events, job_id, last)  # it ended after the first read
        for event in events:
            last = event.id
            yield sse_event(job_id, event, extra)
            if event.type in TERMINAL:
                return
        if ended and not events:
            return  # (events past a long read's limit are read on the next turn)
        now = time.monotonic()
        if now - opened >= lifetime_s:
            payload = {"job_id": job_id, "reason": "stream_lifetime", "last_event_id": last}
            yield f"retry: 1000\nevent: reconnect\ndata: {json.dumps(payload)}\n\n"
            return
        if now - keepalive > keepalive_s:
            keepalive = now
            yield ": keep-alive\n\n"
        await wait_for_change()
