"""``POST /v1/provenance/check``: send an image back, learn what its provenance still says.

The body is the image itself (``Content-Type: image/png``, ``image/jpeg`` or ``image/webp``; up to
the upload limit). The answer is the report of ``imagegen provenance check``: the layers that
survived (signed C2PA manifest, metadata, watermark), the signer, the watermark's tag and, when the
image was rendered by the caller's tenant, its audit record and request id. Another tenant's
image answers exactly like an unknown one (``audit: []``). Needs the ``render`` scope.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from imagegen.serve.errors import ApiError
from imagegen.serve.http.deps import AUTH, ingress_of, scoped
from imagegen.serve.store import ApiKey
from imagegen.serve.tenancy import Caller

router = APIRouter(tags=["provenance"], dependencies=AUTH)

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")


@router.post("/v1/provenance/check")
async def check_provenance(request: Request, key: ApiKey = Depends(scoped("render"))) -> dict[str, Any]:
    """What an image's provenance still says: surviving layers, signer, watermark, the caller's audit record."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in IMAGE_TYPES:
        raise ApiError(
            415, "unsupported_media_type", f"send the image itself as the body ({', '.join(IMAGE_TYPES)})", "body"
        )
    data = await request.body()
    if not data:
        raise ApiError(422, "invalid_image", "the body is empty: send the image's bytes", "body")
    return await ingress_of(request).provenance.check(Caller.of(key), data)
