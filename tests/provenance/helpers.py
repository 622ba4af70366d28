"""Helpers of the provenance tests: a 1024 px real photo, encoders, audit rows.

Tiny presets render 256 px noise at most; the robustness promises are about real photos at the
sizes real presets render, so the tests stamp the bundled astronaut photo upscaled to 1024 px.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass

from PIL import Image

from imagegen import provenance, samples

METADATA = {"prompt": "a portrait", "seed": 7, "preset": "tiny-flux", "character": "mia", "method": "pulid-flux"}


@dataclass(frozen=True)
class Stamped:
    photo: Image.Image
    png: bytes
    image: Image.Image
    image_id: str
    request_id: str
    record: dict


def photo_1024() -> Image.Image:
    return samples.astronaut().resize((1024, 1024), Image.Resampling.LANCZOS)


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt, **options)
    return buffer.getvalue()


def audit_row(image_id: str, request_id: str, tenant: str) -> dict:
    return {
        "image_id": image_id,
        "request_id": request_id,
        "job_id": None,
        "key_id": "k1",
        "tenant": tenant,
        "preset": "tiny-flux",
        "character": "mia",
        "character_version": 2,
        "method": "pulid-flux",
        "prompt_sha256": "0" * 64,
        "seed": 7,
        "watermark_tag": provenance.tag_for(image_id),
    }


def stamp_photo(photo: Image.Image, **options) -> Stamped:
    """``photo`` stamped by ``provenance.stamp`` (what the renderer calls for every image)."""
    image_id, request_id = uuid.uuid4().hex, f"req-{uuid.uuid4().hex[:8]}"
    data, record = provenance.stamp(
        photo, METADATA, image_id=image_id, request_id=request_id, character_version=2, **options
    )
    return Stamped(photo, data, decode(data).convert("RGB"), image_id, request_id, record)
