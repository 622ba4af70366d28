"""``/v1/characters``: register (multipart), list, read, approve and delete characters.

Every route acts for the caller's tenant (``CharacterService`` decides what it sees);
registering and deleting need ``characters:write``, approving needs ``characters:approve``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile

from imagegen.ids import validate_character_id
from imagegen.serve.errors import ApiError
from imagegen.serve.http.deps import AUTH, ingress_of, scoped
from imagegen.serve.http.jsonlimits import parse_json_limited
from imagegen.serve.schemas import CharacterList, CharacterSummary, DeleteOut, RegistrationOut
from imagegen.serve.service import iso
from imagegen.serve.store import ApiKey
from imagegen.serve.tenancy import Caller

router = APIRouter(tags=["characters"], dependencies=AUTH)


def summary(character: Any) -> CharacterSummary:
    return CharacterSummary(
        id=character.id,
        tenant=character.tenant,
        name=character.name,
        status=character.status,
        version=character.version,
        references=len(character.references),
        provenance=character.provenance.model_dump(mode="json"),
        age_check=character.age_check,
        centroid_backends=sorted(character.centroids),
        created_at=iso(character.created_at),
        updated_at=iso(character.updated_at),
    )


def registration_out(registration: Any) -> RegistrationOut:
    return RegistrationOut(
        character=summary(registration.character),
        report=registration.report.to_dict(),
        age_check=dict(registration.age.__dict__),
    )


def _json_field(request: Request, raw: str, field: str) -> Any:
    """A JSON object form field, parsed with the edge's depth limit (deep nesting is a 422, not a crash)."""
    value = parse_json_limited(raw, max_depth=ingress_of(request).cfg.max_json_depth, field=field)
    if not isinstance(value, dict):
        raise ApiError(422, "validation_error", f"{field} must be a JSON object", field)
    return value


@router.post(
    "/v1/characters",
    status_code=201,
    response_model=RegistrationOut,
)
async def create_character(
    request: Request,
    key: ApiKey = Depends(scoped("characters:write")),
    id: str = Form(..., max_length=64, description="Slug: a-z, 0-9, '-' and '_'."),
    name: str = Form(..., min_length=1, max_length=200),
    provenance_json: str = Form(
        ..., alias="provenance", max_length=10_000, description='JSON: {"kind", "creator", "date", "evidence"}'
    ),
    card_json: str | None = Form(None, alias="card", max_length=100_000, description="JSON card (optional)."),
    references: list[UploadFile] = File(..., description="Reference images (PNG, JPEG, WebP)."),
    tenant: str | None = Form(None, max_length=64, description="Owning tenant (admin keys only)."),
) -> RegistrationOut:
    """Register a character (as `draft`) from reference images; returns its reference report."""
    from imagegen.identity.characters import MAX_REFERENCES

    validate_character_id(id)
    provenance_data = _json_field(request, provenance_json, "provenance")
    card = _json_field(request, card_json, "card") if card_json else None
    if len(references) > MAX_REFERENCES:
        raise ApiError(422, "invalid_reference", f"at most {MAX_REFERENCES} references", "references")
    files = [(upload.filename or f"reference-{i}", await upload.read()) for i, upload in enumerate(references)]
    registration = await ingress_of(request).characters.register(
        Caller.of(key), id, name, provenance_data, files, card, tenant
    )
    return registration_out(registration)


@router.get("/v1/characters", response_model=CharacterList)
async def list_characters(
    request: Request,
    status: str | None = Query(None, pattern="^(draft|approved)$"),
    key: ApiKey = Depends(scoped(None)),
) -> CharacterList:
    """The characters of the key's tenant (every tenant's for admin), optionally only `draft` or `approved`."""
    characters = await ingress_of(request).characters.all(Caller.of(key), status)
    return CharacterList(characters=[summary(c) for c in characters])


@router.get("/v1/characters/{character_id}")
async def get_character(request: Request, character_id: str, key: ApiKey = Depends(scoped(None))) -> dict[str, Any]:
    """One character of the key's tenant: card, provenance, references and face analyses (no embeddings)."""
    character = await ingress_of(request).characters.get(Caller.of(key), validate_character_id(character_id))
    data = character.model_dump(mode="json")
    for ref in data["references"]:
        for face in ref["faces"].values():
            face.pop("embedding", None)
    data["centroids"] = sorted(data["centroids"])
    return data


@router.post(
    "/v1/characters/{character_id}/approve",
    response_model=RegistrationOut,
)
async def approve_character(
    request: Request, character_id: str, key: ApiKey = Depends(scoped("characters:approve"))
) -> RegistrationOut:
    """Approve a character: re-runs the reference report and every safeguard first."""
    registration = await ingress_of(request).characters.approve(Caller.of(key), validate_character_id(character_id))
    return registration_out(registration)


@router.delete("/v1/characters/{character_id}", response_model=DeleteOut)
async def delete_character(
    request: Request, character_id: str, key: ApiKey = Depends(scoped("characters:write"))
) -> DeleteOut:
    """Delete a character and every byte of it (its renders and jobs included); says how much went."""
    report, renders = await ingress_of(request).characters.delete(Caller.of(key), validate_character_id(character_id))
    return DeleteOut(deleted=report, renders=renders)
