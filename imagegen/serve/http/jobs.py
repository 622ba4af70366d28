"""``/v1/jobs``: queue a render, follow it (JSON or server-sent events), fetch its images, cancel it.

An event stream holds one of the ingress replica's ``max_ongoing_requests`` slots for as long as it
is open, so streams are capped per key and in total (``serve/limits.py``: 429 past a cap) and each
ends after ``stream_lifetime_s`` with a ``reconnect`` event: the client resumes with
``Last-Event-ID`` and nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from imagegen.serve.errors import ApiError
from imagegen.serve.http.deps import AUTH, ingress_of, key_of, replica, request_id, scoped
from imagegen.serve.job_events import job_event_lines
from imagegen.serve.limits import StreamLease
from imagegen.serve.schemas import JobList, JobOut, RenderBody
from imagegen.serve.store import ApiKey, Job
from imagegen.serve.tenancy import Caller

router = APIRouter(tags=["jobs"], dependencies=AUTH)
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
#: event ids are SQL integers (64-bit); ASCII digits only (str.isdigit() also takes "²")
LAST_EVENT_ID_RE = re.compile(r"^[0-9]{1,19}$")
MAX_EVENT_ID = 2**63 - 1


def last_event_id(header: str | None) -> int:
    """The ``Last-Event-ID`` header as an event id (absent or empty: 0); 400 ``invalid_last_event_id`` otherwise."""
    value = (header or "").strip()
    if not value:
        return 0
    if not LAST_EVENT_ID_RE.match(value) or int(value) > MAX_EVENT_ID:
        shown = value if len(value) <= 24 else value[:24] + "..."
        raise ApiError(
            400,
            "invalid_last_event_id",
            f"Last-Event-ID must be the id of an event of this stream (0 to {MAX_EVENT_ID}), not {shown!r}",
            "Last-Event-ID",
        )
    return int(value)


class LeasedStreamingResponse(StreamingResponse):
    """A streaming response that gives its stream slot back however it ends (done, lifetime, client gone)."""

    def __init__(self, *args: Any, lease: StreamLease, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.lease.release()


async def _own_job(request: Request, job_id: str) -> Job:
    """The job, if the caller's key owns it (or is an admin key); 404 otherwise, whether or not it exists."""
    key = key_of(request, "render")
    missing = ApiError(404, "unknown_job", f"no job {job_id!r} for this key", "job_id")
    if not JOB_ID_RE.match(job_id):
        raise missing
    service = ingress_of(request).service
    job = await service.db(service.store.get_job, job_id)
    if job is None or (job.key_id != key.id and "admin" not in key.scopes):
        raise missing
    return job


@router.post("/v1/jobs", status_code=202, response_model=JobOut)
async def create_job(
    request: Request,
    response: Response,
    body: RenderBody,
    key: ApiKey = Depends(scoped("render")),
    ingress: Any = Depends(replica),
) -> JobOut:
    """Queue a render; returns the job id at once. Follow it with GET /v1/jobs/{id} or its events."""
    # a job asking for more images than its key may have in the renderers at once could never run: 422
    ingress.limits.check_num_images(key, body.num_images)
    # the key's cap and max_queued_jobs are checked in the job's insert, atomically (429 past either)
    caller = Caller.of(key)
    job = await ingress.service.submit_job(body, caller, request_id(request), key_cap=ingress.limits.job_cap(key))
    ingress.runner.wake()
    out = ingress.service.job_out(job)
    response.headers["Location"] = out.links["self"]
    return out


@router.get("/v1/jobs", response_model=JobList)
async def list_jobs(
    limit: int = Query(50, ge=1, le=500),
    key: ApiKey = Depends(scoped("render")),
    ingress: Any = Depends(replica),
) -> JobList:
    """This key's most recent jobs (every job for an admin key)."""
    service = ingress.service
    jobs = await service.db(service.store.list_jobs, None if "admin" in key.scopes else key.id, limit)
    return JobList(jobs=[service.job_out(j) for j in jobs])


@router.get("/v1/jobs/{job_id}", response_model=JobOut)
async def get_job(request: Request, job_id: str, include_images: bool = Query(False)) -> JobOut:
    """A job's status, progress, error or result (`include_images=true`: PNGs inline as base64)."""
    job = await _own_job(request, job_id)
    service = ingress_of(request).service
    return await service.db(service.job_out, job, include_images)


@router.get("/v1/jobs/{job_id}/images/{index}", response_class=Response)
async def get_job_image(request: Request, job_id: str, index: int) -> Response:
    """One image of a finished job, as image/png."""
    job = await _own_job(request, job_id)
    images = (job.result or {}).get("images", [])
    if not 0 <= index < len(images) or not images[index].get("digest"):
        raise ApiError(404, "not_found", f"job {job_id} has no image {index}", "index")
    service = ingress_of(request).service
    png = await service.db(service.store.results.get, images[index]["digest"])
    return Response(png, media_type="image/png", headers={"X-Image-Id": images[index]["image_id"]})


@router.delete("/v1/jobs/{job_id}", response_model=JobOut)
async def cancel_job(request: Request, job_id: str) -> JobOut:
    """Cancel a queued or running job (a finished one: 409)."""
    job = await _own_job(request, job_id)
    if job.status in ("done", "failed"):
        raise ApiError(409, "job_finished", f"job {job_id} already ended {job.status}", "job_id")
    ingress = ingress_of(request)
    cancelled = await ingress.service.db(ingress.service.store.cancel_job, job_id)
    ingress.runner.cancel_local(job_id)
    ingress.notify_job(job_id)
    return ingress.service.job_out(cancelled)


@router.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse)
async def job_events(request: Request, job_id: str) -> StreamingResponse:
    """Server-sent events: `queued`, `started`, `progress`, `retry`, then `done`, `failed` or `cancelled`.

    Each event's `id` is resumable with `Last-Event-ID`; `data` is JSON. A stream open longer than
    the server's stream lifetime ends with a `reconnect` event (no id): reconnect with the last id seen.
    Open streams are capped per key and per server (429 `too_many_streams`).
    """
    last = last_event_id(request.headers.get("last-event-id"))
    job = await _own_job(request, job_id)
    return job_event_stream(request, key_of(request, "render"), job_id, last, headers={"X-Job-Status": job.status})


def job_event_stream(
    request: Request, key: ApiKey, job_id: str, last: int, *, extra: dict | None = None, headers: dict
) -> LeasedStreamingResponse:
    """The SSE stream of a job's events after ``last`` (one for `/v1/jobs/{id}/events` and the design events).

    ``extra`` is added to every event's data (a design's id); the stream counts against ``key``'s
    open-stream cap, ends at a terminal event or after the key's stream lifetime (with a
    `reconnect` event), and sends keep-alive comments while the job is quiet.
    """
    ingress = ingress_of(request)
    service = ingress.service
    lifetime = ingress.cfg.limits_for(key.name).stream_lifetime_s
    lease = ingress.limits.open_stream(key)

    async def wait_for_change() -> None:
        with contextlib.suppress(TimeoutError):  # the signal is replaced on each change: read it each time
            await asyncio.wait_for(ingress.job_signal.wait(), timeout=0.25)

    lines = job_event_lines(
        service.store,
        service.db,
        job_id,
        last,
        lifetime_s=lifetime,
        keepalive_s=ingress.cfg.sse_keepalive_s,
        wait_for_change=wait_for_change,
        extra=extra,
    )
    return LeasedStreamingResponse(
        lines,
        lease=lease,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
    )
