"""``/v1/jobs``: queue a render, follow it (JSON or server-sent events), fetch its images, cancel it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse

from imagegen.serve.errors import ApiError
from imagegen.serve.http.deps import AUTH, ingress_of, key_of, replica, request_id, scoped
from imagegen.serve.schemas import JobList, JobOut, RenderBody
from imagegen.serve.service import iso
from imagegen.serve.store import TERMINAL, ApiKey, Job

router = APIRouter(tags=["jobs"], dependencies=AUTH)
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
SSE_TERMINAL = set(TERMINAL)


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
    job = await ingress.service.submit_job(body, key.id, request_id(request))
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

    Each event's `id` is resumable with `Last-Event-ID`; `data` is JSON.
    """
    job = await _own_job(request, job_id)
    ingress = ingress_of(request)
    service = ingress.service
    last_header = request.headers.get("last-event-id", "0")
    last = int(last_header) if last_header.isdigit() else 0

    async def stream():
        nonlocal last
        keepalive = time.monotonic()
        while True:
            events = await service.db(service.store.events, job_id, last)
            for event in events:
                last = event.id
                payload = {"job_id": job_id, **event.data, "at": iso(event.created_at)}
                yield f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(payload)}\n\n"
                if event.type in SSE_TERMINAL:
                    return
            if not events:
                current = await service.db(service.store.get_job, job_id)
                if current is None or current.status in SSE_TERMINAL:
                    return
            if time.monotonic() - keepalive > ingress.cfg.sse_keepalive_s:
                keepalive = time.monotonic()
                yield ": keep-alive\n\n"
            async with ingress.job_signal:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ingress.job_signal.wait(), timeout=0.25)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Job-Status": job.status},
    )
