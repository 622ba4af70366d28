"""``POST /v1/renders``: a synchronous render, as JSON with base64 PNGs or as one PNG."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from imagegen.serve.errors import ApiError
from imagegen.serve.http.deps import AUTH, replica, request_id, scoped
from imagegen.serve.http.timing import add_render_phases, of_scope
from imagegen.serve.schemas import RenderBody, RenderOut
from imagegen.serve.store import ApiKey
from imagegen.serve.tenancy import Caller

router = APIRouter(tags=["renders"], dependencies=AUTH)


def _prefers_png(accept: str) -> bool:
    first = accept.split(",")[0].split(";")[0].strip().lower()
    return first == "image/png"


@router.post(
    "/v1/renders",
    response_model=RenderOut,
    responses={200: {"content": {"image/png": {}}, "description": "JSON, or one PNG with `Accept: image/png`"}},
)
async def render(
    request: Request,
    body: RenderBody,
    format: str | None = Query(None, pattern="^(json|png)$", description="`png`: the single image as image/png"),
    key: ApiKey = Depends(scoped("render")),
    ingress: Any = Depends(replica),
) -> Any:
    """Render synchronously: JSON with base64 PNGs, or the PNG itself for a single image."""
    timing = of_scope(request.scope)
    if timing is not None:
        timing.mark("parse")
    want_png = format == "png" or (format is None and _prefers_png(request.headers.get("accept", "")))
    if want_png and body.num_images != 1:
        raise ApiError(406, "not_acceptable", "image/png returns one image: ask for num_images=1 or JSON", "format")
    # this key's renders in progress (429 too_many_renders) and its images in the renderers (429 too_many_images;
    # num_images above the key's limit: 422)
    with ingress.limits.render_slot(key), ingress.limits.image_slots(key, body.num_images):
        rendered = await ingress.sync.render(body, Caller.of(key), request_id(request))
    if timing is not None:
        add_render_phases(timing, rendered)
    if want_png:
        image, png = rendered.out.images[0], rendered.pngs[0]
        if png is None:
            raise ApiError(500, "bad_output", f"the image came out unusable ({image.problem})")
        headers = {"X-Image-Id": image.image_id, "X-Seed": str(image.seed)}
        if image.identity_similarity is not None:
            headers["X-Identity-Similarity"] = str(image.identity_similarity)
        return Response(png, media_type="image/png", headers=headers)
    for image, png in zip(rendered.out.images, rendered.pngs, strict=True):
        image.png_base64 = base64.b64encode(png).decode() if png is not None else None
    return rendered.out
