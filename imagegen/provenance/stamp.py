"""Stamping: watermark the pixels, write the metadata, encode once, sign the C2PA manifest.

Three layers, each for a different way an image travels: the signed C2PA manifest (tamper-
evident, says who made it; lost on re-encode), the metadata (PNG text chunks, or a JPEG comment:
readable by anything; stripped by most platforms) and the invisible watermark (survives
re-encoding, resizing and centred crops; carries only a 32-bit tag that finds the audit record).
"""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime
from typing import Any

from PIL import Image

import imagegen.provenance.manifest as manifest
import imagegen.provenance.png as png
import imagegen.provenance.watermark as watermark
from imagegen.images import RECORD_KEY, png_info
from imagegen.provenance.keys import signer_material
from imagegen.settings import get_settings
from imagegen.versions import library_versions

IPTC_AI_GENERATED = manifest.IPTC_AI_GENERATED
WATERMARK_METHOD = watermark.SCHEME
PAYLOAD_BITS = watermark.CODE_BITS
MIN_WATERMARK_SIDE = watermark.MIN_WATERMARK_SIDE
EXEMPT_REASON = watermark.EXEMPT_REASON
#: the JPEG comment that carries the metadata a PNG keeps in text chunks
JPEG_COMMENT_PREFIX = "imagegen-provenance:"
FORMATS = ("png", "jpeg")
#: text chunks written besides png_info's
PROVENANCE_CHUNKS = (
    "ai_generated",
    "DigitalSourceType",
    "character",
    "character_version",
    "method",
    "request_id",
    "image_id",
    "created_at",
    "watermark",
)


def tag_for(image_id: str) -> int:
    """The 32-bit watermark tag of an image id (its first 8 hex digits)."""
    return int(image_id[:8], 16)


def watermarkable(image: Image.Image) -> bool:
    return watermark.watermarkable(image)


def embed_watermark(image: Image.Image, tag: int) -> tuple[Image.Image, dict[str, Any]]:
    """``image`` with the watermark of ``tag``, and what was done (exempt when too small)."""
    if not watermark.watermarkable(image):
        return image, {"applied": False, "exempt": True, "reason": EXEMPT_REASON, "method": WATERMARK_METHOD}
    marked = watermark.embed(image, tag)
    info = {"applied": True, "exempt": False, "method": WATERMARK_METHOD, "bits": PAYLOAD_BITS, "tag": f"{tag:08x}"}
    return marked, info


def read_watermark(image: Image.Image) -> dict[str, Any]:
    """Look for the watermark (``watermark.detect``): found, the tag, the scheme and where it was found."""
    return watermark.detect(image)


def without_prompt(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` with the prompt and negative prompt replaced by their SHA-256 (``prompt_sha256``)."""
    if "prompt" not in metadata and "negative_prompt" not in metadata:
        return metadata
    kept = {k: v for k, v in metadata.items() if k not in ("prompt", "negative_prompt")}
    kept["prompt_sha256"] = prompt_sha256(metadata.get("prompt") or "", metadata.get("negative_prompt") or "")
    return kept


def prompt_sha256(prompt: str, negative_prompt: str = "") -> str:
    """The hash images and audit rows carry instead of the prompt (NUL-separated, so pairs never collide)."""
    return hashlib.sha256(f"{prompt}\x00{negative_prompt}".encode()).hexdigest()


def stamp(
    image: Image.Image,
    metadata: dict[str, Any],
    *,
    image_id: str,
    request_id: str,
    character_version: int | None = None,
    extra: dict[str, Any] | None = None,
    include_prompt: bool | None = None,
    fmt: str = "png",
    quality: int = 92,
    encode_threads: int | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Watermark ``image``, encode it as ``fmt`` with its metadata and sign it; returns (bytes, record).

    ``encode_threads``: the most threads a large PNG's encode may use (``imagegen.provenance.png.encode``).

    Images get shared: the file carries the request id and the recipe (seed, steps, sizes,
    character, method) but the prompt only as its SHA-256, unless ``include_prompt`` (default:
    ``IMAGEGEN_METADATA_INCLUDE_PROMPT``) opts in. The audit trail keeps the same hash.
    """
    if fmt not in FORMATS:
        raise ValueError(f"images are stamped as {' or '.join(FORMATS)}, not {fmt!r}")
    if include_prompt is None:
        include_prompt = get_settings().metadata_include_prompt
    metadata = metadata if include_prompt else without_prompt(metadata)
    signer = signer_material()
    marked, mark = embed_watermark(image, tag_for(image_id))
    record = {
        "ai_generated": True,
        "digital_source_type": IPTC_AI_GENERATED,
        "image_id": image_id,
        "request_id": request_id,
        "preset": metadata.get("preset"),
        "character": metadata.get("character"),
        "character_version": character_version,
        "method": metadata.get("method"),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "watermark": mark,
        "c2pa": {"signer": signer.source, "format": fmt},
        "versions": metadata.get("versions") or library_versions(),
        **(extra or {}),
    }
    full = {**metadata, "provenance": record}
    chunks = {
        "ai_generated": "true",
        "DigitalSourceType": IPTC_AI_GENERATED,
        "character": record["character"],
        "character_version": character_version,
        "method": record["method"],
        "request_id": request_id,
        "image_id": image_id,
        "created_at": record["created_at"],
        "watermark": json.dumps(mark, sort_keys=True),
    }
    if fmt == "png":
        info = png_info(full)
        for key, value in chunks.items():
            if value is not None:
                info.add_itxt(key, str(value))
        encoded = png.encode(marked, info, encode_threads)  # level 1, run-length, Paeth rows, in strips when large
    else:
        text = {k: str(v) for k, v in chunks.items() if v is not None}
        text[RECORD_KEY] = json.dumps(full, sort_keys=True, default=str)
        comment = JPEG_COMMENT_PREFIX + json.dumps(text, sort_keys=True)
        buffer = io.BytesIO()
        marked.convert("RGB").save(buffer, format="JPEG", quality=quality, comment=comment.encode())
        encoded = buffer.getvalue()
    return manifest.sign(encoded, fmt, record, signer), record


def read_metadata(image: Image.Image) -> dict[str, Any]:
    """The text ``stamp`` wrote: PNG text chunks or the JPEG comment (empty for a stripped file)."""
    text = dict(getattr(image, "text", {}) or {})
    comment = image.info.get("comment")
    if not text and isinstance(comment, bytes | str):
        raw = comment.decode(errors="replace") if isinstance(comment, bytes) else comment
        if raw.startswith(JPEG_COMMENT_PREFIX):
            try:
                text = {str(k): str(v) for k, v in json.loads(raw[len(JPEG_COMMENT_PREFIX) :]).items()}
            except (ValueError, AttributeError):
                text = {}
    record = {}
    if RECORD_KEY in text:
        try:
            record = json.loads(text[RECORD_KEY])
        except ValueError:
            record = {}
    return {"chunks": {k: v for k, v in text.items() if k != RECORD_KEY}, "record": record}
