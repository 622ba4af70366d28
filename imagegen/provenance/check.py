"""Read an image's provenance back: which layers survived, who signed it, and the request that made it.

The audit record (who rendered it, with which key, when) is private to the tenant that rendered
the image: a look-up names the asking tenant and sees only that tenant's rows, so a watermark
found in an image from elsewhere never tells one tenant about another's renders.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

import imagegen.provenance.manifest as manifest
from imagegen.provenance.stamp import read_metadata, read_watermark

#: formats the C2PA reader is asked about (others cannot carry a manifest we wrote)
C2PA_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
DEVELOPMENT_SIGNER = "development signer"
_LENIENT = threading.Lock()


def _decode(data: bytes) -> tuple[Image.Image, str | None]:
    """The image in ``data``, loaded, and why its pixel stream is damaged (None when it is sound).

    A damaged stream (a cut download, flipped bytes) still holds most of its pixels and its
    metadata, so the check decodes what is left in Pillow's truncated-image mode rather than
    fail. Pillow has only a process-wide switch; holding it for one load can at worst let another
    thread's damaged image decode too, never fail a sound one.
    """
    opened = Image.open(io.BytesIO(data))
    try:
        opened.load()
        return opened, None
    except OSError as exc:
        opened.close()
        damaged = str(exc)
    with _LENIENT:
        before = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            opened = Image.open(io.BytesIO(data))
            opened.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = before
    return opened, damaged


def check_image(source: bytes | str | Path, store: Any = None, *, tenant: str | None = None) -> dict[str, Any]:
    """Everything an image says about where it came from.

    ``store`` (a ``ServeStore``) with ``tenant``: the watermark tag (or the image id the metadata
    or manifest names) is looked up in that tenant's audit trail; rows of other tenants are never
    returned.
    """
    if store is not None and tenant is None:
        raise ValueError("an audit look-up names the tenant it is for")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    opened, damaged = _decode(data)
    with opened:
        fmt = opened.format
        meta = read_metadata(opened)
        image = opened.convert("RGB")
    mark = read_watermark(image)
    chunks = meta["chunks"]
    c2pa = manifest.read_manifest(data, C2PA_FORMATS[fmt]) if fmt in C2PA_FORMATS else {"present": False}
    image_id = chunks.get("image_id") or (meta["record"].get("provenance") or {}).get("image_id")
    image_id = image_id or (c2pa.get("image_id") if c2pa.get("valid") else None)
    agrees = None
    if mark.get("found") and image_id:
        agrees = mark["tag"] == image_id[:8]
    layers = {
        "manifest": bool(c2pa.get("present") and c2pa.get("valid")),
        "text_chunks": bool(chunks),
        "watermark": bool(mark.get("found")),
    }
    signer = None
    if c2pa.get("present"):
        who = c2pa["signer"] if "signer" in c2pa else {}
        signer = (DEVELOPMENT_SIGNER + ": " if who.get("development") else "") + (who.get("common_name") or "?")
    report: dict[str, Any] = {
        "format": fmt,
        "size": list(image.size),
        "damaged": damaged,
        "ai_generated": chunks.get("ai_generated") == "true" or layers["watermark"] or layers["manifest"],
        "layers": layers,
        "survived": [name for name, kept in layers.items() if kept],
        "signer": signer,
        "manifest": c2pa,
        "metadata": {
            "present": bool(chunks),
            "image_id": image_id,
            "request_id": chunks.get("request_id"),
            "character": chunks.get("character"),
            "character_version": chunks.get("character_version"),
            "preset": chunks.get("preset"),
            "method": chunks.get("method"),
            "seed": chunks.get("seed"),
            "watermark": json.loads(chunks["watermark"]) if "watermark" in chunks else None,
        },
        "watermark": mark,
        "watermark_matches_metadata": agrees,
    }
    if store is not None:
        report.update(_audit(store, tenant, mark, image_id))
    return report


def _audit(store: Any, tenant: str, mark: dict[str, Any], image_id: str | None) -> dict[str, Any]:
    """This tenant's audit rows for the image: by the watermark's tag, else by the named image id."""
    rows: list[dict[str, Any]] = []
    if mark.get("found") and mark.get("tag"):
        rows = [r for r in store.audit_by_tag(int(mark["tag"], 16)) if r["tenant"] == tenant]
    if not rows and image_id:
        row = store.audit_for_image(image_id)
        rows = [row] if row is not None and row["tenant"] == tenant else []
    requests = sorted({r["request_id"] for r in rows})
    return {
        "audit_tenant": tenant,
        "audit": rows,
        "audit_reached": bool(rows),
        "request_id": requests[0] if len(requests) == 1 else None,
    }
