"""Stamping without a server: the watermark at 512 px, exemption, metadata in PNG and JPEG, read-back."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from imagegen import samples
from imagegen.provenance import (
    IPTC_AI_GENERATED,
    WATERMARK_METHOD,
    check_image,
    embed_watermark,
    prompt_sha256,
    read_watermark,
    stamp,
    tag_for,
)
from tests.provenance.helpers import METADATA, decode, encode

IMAGE_ID = "c0ffee11" + "0" * 24


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    return decode(encode(image, "JPEG", quality=quality)).convert("RGB")


def test_watermark_survives_jpeg_70_at_512px():
    photo = samples.astronaut().convert("RGB")
    assert photo.size == (512, 512)
    marked, info = embed_watermark(photo, tag_for(IMAGE_ID))
    assert info["applied"] and info["bits"] == 96 and info["method"] == WATERMARK_METHOD
    diff = np.asarray(marked, dtype=np.float64) - np.asarray(photo, dtype=np.float64)
    assert 10 * np.log10(255**2 / np.mean(diff**2)) > 36
    reading = read_watermark(jpeg(marked, 70))
    assert reading["found"] and reading["tag"] == IMAGE_ID[:8] and reading["scheme"] == WATERMARK_METHOD
    # an unmarked photo does not read as marked, not even after the detector's whole search
    clean = read_watermark(jpeg(photo, 70))
    assert not clean["found"] and clean["candidates_tried"] > 20


def test_watermark_on_other_photos():
    for photo in (samples.grace_hopper().convert("RGB"), samples.no_face_image().convert("RGB")):
        marked, _ = embed_watermark(photo, 0x12345678)
        assert read_watermark(jpeg(marked, 85))["tag"] == "12345678"


def test_small_images_are_exempt_and_say_so():
    small = Image.new("RGB", (255, 512), "gray")
    marked, info = embed_watermark(small, 1)
    assert marked is small and info["applied"] is False and info["exempt"] is True
    assert "256" in info["reason"]
    png, record = stamp(small, METADATA, image_id=IMAGE_ID, request_id="req-1")
    report = check_image(png)
    assert report["metadata"]["watermark"]["exempt"] is True
    assert report["watermark"]["found"] is False
    assert report["ai_generated"] is True and report["layers"] == {
        "manifest": True,
        "text_chunks": True,
        "watermark": False,
    }


def test_stamp_writes_the_metadata_and_check_reads_it_back(tmp_path):
    photo = samples.astronaut().convert("RGB")
    png, record = stamp(photo, METADATA, image_id=IMAGE_ID, request_id="req-42", character_version=3)
    assert record["ai_generated"] and record["watermark"]["applied"]
    image = Image.open(io.BytesIO(png))
    text = image.text
    assert text["ai_generated"] == "true" and text["DigitalSourceType"] == IPTC_AI_GENERATED
    assert text["character"] == "mia" and text["character_version"] == "3"
    assert text["request_id"] == "req-42" and text["image_id"] == IMAGE_ID
    # the recipe, not the prompt: images get shared (its hash is what the audit trail keeps too)
    assert "prompt" not in text and text["seed"] == "7" and text["method"] == "pulid-flux"
    assert text["prompt_sha256"] == prompt_sha256("a portrait", METADATA.get("negative_prompt") or "")
    assert "a portrait" not in str(text)
    opted_in = Image.open(io.BytesIO(stamp(photo, METADATA, image_id=IMAGE_ID, request_id="r", include_prompt=True)[0]))
    assert opted_in.text["prompt"] == "a portrait"
    assert json.loads(text["imagegen"])["provenance"]["image_id"] == IMAGE_ID
    report = check_image(png)
    assert report["watermark"]["found"] and report["watermark_matches_metadata"] is True
    assert report["metadata"]["image_id"] == IMAGE_ID
    assert report["survived"] == ["manifest", "text_chunks", "watermark"]
    # after a JPEG re-encode the metadata and the manifest are gone; the watermark still says where it came from
    path = tmp_path / "shared.jpg"
    jpeg(image, 85).save(path, quality=85)
    report = check_image(path)
    assert report["metadata"]["present"] is False and report["manifest"]["present"] is False
    assert report["watermark"]["found"] and report["watermark"]["tag"] == IMAGE_ID[:8]
    assert report["ai_generated"] is True and report["survived"] == ["watermark"]


def test_jpeg_output_carries_every_layer():
    photo = samples.astronaut().convert("RGB")
    data, record = stamp(photo, METADATA, image_id=IMAGE_ID, request_id="req-jpeg", fmt="jpeg")
    assert data[:2] == b"\xff\xd8" and record["c2pa"]["format"] == "jpeg"
    report = check_image(data)
    assert report["format"] == "JPEG"
    assert report["survived"] == ["manifest", "text_chunks", "watermark"]
    assert report["metadata"]["request_id"] == "req-jpeg" and report["metadata"]["character"] == "mia"
    assert report["watermark"]["tag"] == IMAGE_ID[:8]
    assert report["manifest"]["request_id"] == "req-jpeg"
    assert "a portrait" not in data.decode("latin-1")
