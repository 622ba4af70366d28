"""``/v1/designs``: design a fictional character from a description (describe, pick, turnaround, curate, register).

Routes parse, authorise and call ``DesignService`` (``imagegen/serve/designs.py``). Writing needs
``characters:write``; reading needs any key of the design's tenant (another tenant's design is a
404 ``not_found``, exactly like a missing one). Steps that render answer 202 with the design
(``status: rendering``, ``job_id``); follow them with ``GET /v1/designs/{id}/events`` (the job
events' vocabulary: ``queued``, ``started``, ``progress``, then ``done`` / ``failed`` /
``cancelled``; resumable with ``Last-Event-ID``) or by polling the design.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from imagegen.identity.design.flow import design_dict
from imagegen.serve.errors import ApiError
from imagegen.serve.http.characters import registration_out
from imagegen.serve.http.deps import AUTH, ingress_of, key_of, request_id, scoped
from imagegen.serve.http.jobs import job_event_stream, last_event_id
from imagegen.serve.http.jsonlimits import parse_json_limited
from imagegen.serve.schemas import RegistrationOut
from imagegen.serve.store import ApiKey
from imagegen.serve.tenancy import Caller

router = APIRouter(tags=["designs"], dependencies=AUTH)
DESIGN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
IMAGE_ID_RE = re.compile(r"^[0-9a-f]{32}$")


class DesignBody(BaseModel):
    """A new design: the character it will become, its card, the preset and how many candidates."""

    model_config = ConfigDict(extra="forbid", strict=True)

    character_id: str = Field(min_length=1, max_length=64, description="The id it will register as (a slug).")
    name: str = Field(min_length=1, max_length=200)
    card: dict[str, Any] = Field(default_factory=dict, description="look, personality, style_notes, extra")
    preset: str | None = Field(default=None, max_length=64, description="Default: the first preset served.")
    candidates: StrictInt = Field(default=8, ge=1, description="Candidate portraits (the server caps it, 16).")
    seed: StrictInt | None = Field(default=None, ge=0, description="Seed of candidate 0 (candidate i: seed + i).")


class PickBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    candidates: list[StrictInt] = Field(min_length=1, max_length=16)


class TurnaroundBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    grid: str | dict[str, Any] | None = Field(
        default=None, description='A grid name ("default", "quick") or {"slots": [...]}'
    )
    method: str | None = Field(default=None, max_length=64)


class CurateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    drop: list[StrictInt] = Field(default_factory=list, max_length=16)
    keep: list[StrictInt] = Field(default_factory=list, max_length=16)
    reroll: list[StrictInt] = Field(default_factory=list, max_length=16)


class RegisterBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    provenance: dict[str, Any] = Field(description='{"kind": "synthetic"|"consented"|"licensed", "who", "evidence"}')


def _design_id(design_id: str) -> str:
    if not DESIGN_ID_RE.match(design_id):
        raise ApiError(404, "not_found", f"no design {design_id[:40]!r}", "design_id")
    return design_id


def _out(design: Any) -> dict[str, Any]:
    data = design_dict(design)
    data["links"] = {"self": f"/v1/designs/{design.id}", "events": f"/v1/designs/{design.id}/events"}
    return data


async def _check_jobs(request: Request, key: ApiKey) -> int:
    """429 ``too_many_jobs`` early, before a step changes the design; returns the key's job cap, which the
    step's job insert checks again, atomically with other submissions (``DesignService._submit``)."""
    from imagegen.serve.limits import count_active_jobs_of

    ingress = ingress_of(request)
    active = await ingress.service.db(count_active_jobs_of, ingress.service.store, key.id)
    ingress.limits.check_jobs(key, active)
    return ingress.limits.job_cap(key)


@router.post("/v1/designs", status_code=202)
async def create_design(
    request: Request, body: DesignBody, key: ApiKey = Depends(scoped("characters:write"))
) -> dict[str, Any]:
    """Describe: start a design and render its candidate portraits (one batched job)."""
    cap = await _check_jobs(request, key)
    design = await ingress_of(request).designs.create(Caller.of(key), body.model_dump(), request_id(request), cap)
    return _out(design)


@router.get("/v1/designs")
async def list_designs(request: Request, key: ApiKey = Depends(scoped(None))) -> dict[str, Any]:
    """The designs of the key's tenant (every tenant's for admin), newest first."""
    designs = await ingress_of(request).designs.all(Caller.of(key))
    return {"designs": [_out(d) for d in designs]}


@router.get("/v1/designs/{design_id}")
async def get_design(request: Request, design_id: str, key: ApiKey = Depends(scoped(None))) -> dict[str, Any]:
    """One design: stage, status, candidates, pick, slots and the report."""
    return _out(await ingress_of(request).designs.get(Caller.of(key), _design_id(design_id)))


@router.get("/v1/designs/{design_id}/images/{image_id}", response_class=Response)
async def get_design_image(
    request: Request, design_id: str, image_id: str, key: ApiKey = Depends(scoped(None))
) -> Response:
    """A candidate, upload or slot as image/png."""
    if not IMAGE_ID_RE.match(image_id):
        raise ApiError(404, "not_found", f"no image {image_id[:40]!r}", "image_id")
    png = await ingress_of(request).designs.image(Caller.of(key), _design_id(design_id), image_id)
    return Response(png, media_type="image/png", headers={"X-Image-Id": image_id, "Cache-Control": "private"})


@router.post("/v1/designs/{design_id}/pick")
async def pick(request: Request, design_id: str, key: ApiKey = Depends(scoped("characters:write"))) -> dict[str, Any]:
    """Pick candidates (JSON ``{"candidates": [i, ...]}``) or upload the artist's own image (multipart ``image`` +
    ``provenance`` JSON ``{"kind": "licensed"|"consented", "who", "evidence"}``)."""
    designs = ingress_of(request).designs
    caller = Caller.of(key)
    _design_id(design_id)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "validation_error", "send the image as the multipart file field `image`", "image")
        raw = form.get("provenance")
        if not isinstance(raw, str) or not raw:
            raise ApiError(
                422,
                "invalid_provenance",
                'an upload needs provenance: JSON {"kind": "licensed"|"consented", "who": ..., "evidence": ...}',
                "provenance",
            )
        if len(raw) > 10_000:
            raise ApiError(422, "invalid_provenance", "provenance is longer than 10000 characters", "provenance")
        data = parse_json_limited(raw, max_depth=ingress_of(request).cfg.max_json_depth, field="provenance")
        if not isinstance(data, dict):
            raise ApiError(422, "invalid_provenance", "provenance must be a JSON object", "provenance")
        content = await upload.read()
        design = await designs.pick(caller, design_id, upload=(upload.filename or "upload", content, data))
        return _out(design)
    try:
        body = PickBody.model_validate_json(await request.body())
    except ValueError as exc:
        from imagegen.serve.errors import validation_error

        errors = exc.errors() if hasattr(exc, "errors") else [{"msg": str(exc)}]
        raise validation_error(errors) from None
    return _out(await designs.pick(caller, design_id, indices=body.candidates))


@router.post("/v1/designs/{design_id}/turnaround", status_code=202)
async def turnaround(
    request: Request, design_id: str, body: TurnaroundBody, key: ApiKey = Depends(scoped("characters:write"))
) -> dict[str, Any]:
    """Render the turnaround grid from the pick, identity-conditioned (one batched job)."""
    cap = await _check_jobs(request, key)
    design = await ingress_of(request).designs.turnaround(
        Caller.of(key), _design_id(design_id), body.grid, body.method, request_id(request), cap
    )
    return _out(design)


@router.post("/v1/designs/{design_id}/curate")
async def curate(
    request: Request,
    response: Response,
    design_id: str,
    body: CurateBody,
    key: ApiKey = Depends(scoped("characters:write")),
) -> dict[str, Any]:
    """Keep, drop or re-roll slots: 200 with the new report, or 202 while re-rolls render."""
    cap = await _check_jobs(request, key) if body.reroll else None
    design, rendering = await ingress_of(request).designs.curate(
        Caller.of(key), _design_id(design_id), body.model_dump(), request_id(request), cap
    )
    if rendering:
        response.status_code = 202
    return _out(design)


@router.post("/v1/designs/{design_id}/register", status_code=201, response_model=RegistrationOut)
async def register(
    request: Request, design_id: str, body: RegisterBody, key: ApiKey = Depends(scoped("characters:write"))
) -> RegistrationOut:
    """Register the kept slots as a draft character (``synthetic`` only for sets rendered here from start to end)."""
    registration = await ingress_of(request).designs.register(Caller.of(key), _design_id(design_id), body.provenance)
    return registration_out(registration)


@router.delete("/v1/designs/{design_id}")
async def delete_design(
    request: Request, design_id: str, key: ApiKey = Depends(scoped("characters:write"))
) -> dict[str, Any]:
    """Delete the design and every byte it made (images, draft identity, its jobs)."""
    return {"deleted": await ingress_of(request).designs.delete(Caller.of(key), _design_id(design_id))}


@router.get("/v1/designs/{design_id}/events", response_class=StreamingResponse)
async def design_events(request: Request, design_id: str) -> StreamingResponse:
    """Server-sent events of the design's current job (resumable with ``Last-Event-ID``)."""
    last = last_event_id(request.headers.get("last-event-id"))
    key = key_of(request, None)
    ingress = ingress_of(request)
    design = await ingress.designs.get(Caller.of(key), _design_id(design_id))
    if design.job_id is None:
        raise ApiError(409, "design_not_ready", "this design has no job yet", "design_id")
    return job_event_stream(
        request, key, design.job_id, last, extra={"design_id": design_id}, headers={"X-Job-Id": design.job_id}
    )
