"""``/v1/characters/{id}/...``: a character's references, contact sheet, reference report and recent renders.

Reads for any key of the character's tenant (``admin``: any tenant); another tenant's character
answers exactly like a missing one (404 ``unknown_character``). Images are answered as their own
media type with ``Cache-Control: private, no-store``: a page fetches them with its key as blobs.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from imagegen.ids import validate_character_id
from imagegen.serve.errors import ApiError
from imagegen.serve.http.deps import AUTH, ingress_of, scoped
from imagegen.serve.store import ApiKey
from imagegen.serve.tenancy import Caller

router = APIRouter(tags=["characters"], dependencies=AUTH)
IMAGE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
#: what image answers carry: fetched with a key, never cached by a shared cache, never sniffed
PRIVATE = {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"}
PNG = {200: {"content": {"image/png": {}}, "description": "The image."}}


@router.get("/v1/characters/{character_id}/references")
async def list_references(request: Request, character_id: str, key: ApiKey = Depends(scoped(None))) -> dict[str, Any]:
    """The character's reference images: index, size, digest (`image_id`), image URL and the face analysis."""
    references = await ingress_of(request).library.references(Caller.of(key), validate_character_id(character_id))
    return {"character": character_id, "references": references}


@router.get("/v1/characters/{character_id}/references/{index}", response_class=Response, responses=PNG)
async def get_reference(
    request: Request, character_id: str, index: int, key: ApiKey = Depends(scoped(None))
) -> Response:
    """One reference image, as stored (PNG)."""
    data, media_type = await ingress_of(request).library.reference_image(
        Caller.of(key), validate_character_id(character_id), index
    )
    return Response(data, media_type=media_type, headers=PRIVATE)


@router.get("/v1/characters/{character_id}/contact-sheet", response_class=Response, responses=PNG)
async def get_contact_sheet(request: Request, character_id: str, key: ApiKey = Depends(scoped(None))) -> Response:
    """Every reference with its face box, landmarks and scores (green usable, orange flagged, red refused)."""
    sheet = await ingress_of(request).library.sheet(Caller.of(key), validate_character_id(character_id))
    return Response(sheet.contact_sheet, media_type="image/png", headers=PRIVATE)


@router.get("/v1/characters/{character_id}/report")
async def get_report(request: Request, character_id: str, key: ApiKey = Depends(scoped(None))) -> dict[str, Any]:
    """The reference report of the stored references: per image and per set, flags, verdict and reasons."""
    sheet = await ingress_of(request).library.sheet(Caller.of(key), validate_character_id(character_id))
    return sheet.report


@router.get("/v1/characters/{character_id}/renders")
async def list_renders(
    request: Request,
    character_id: str,
    limit: int = Query(50, ge=1, le=200),
    key: ApiKey = Depends(scoped(None)),
) -> dict[str, Any]:
    """The tenant's most recent renders of the character (sync and jobs), newest first, with their scores.

    `similarity` is null when the render was not scored (scores come from the consistency gate:
    send `min_identity_similarity`); `threshold` is the gate's; `image_url` is set while a job keeps the image.
    """
    renders = await ingress_of(request).library.renders(Caller.of(key), validate_character_id(character_id), limit)
    return {"character": character_id, "renders": renders}


@router.get("/v1/characters/{character_id}/renders/{image_id}", response_class=Response, responses=PNG)
async def get_render(
    request: Request, character_id: str, image_id: str, key: ApiKey = Depends(scoped(None))
) -> Response:
    """The PNG of one recent render while its job keeps it (a synchronous render's PNG was only in its response)."""
    character_id = validate_character_id(character_id)
    if not IMAGE_ID_RE.match(image_id):
        raise ApiError(404, "not_found", f"no stored image {image_id[:40]!r} of character {character_id!r}", "image_id")
    png = await ingress_of(request).library.render_image(Caller.of(key), character_id, image_id)
    return Response(png, media_type="image/png", headers={**PRIVATE, "X-Image-Id": image_id})
