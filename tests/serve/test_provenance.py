"""Provenance without a server: watermark read-back after JPEG, exemption, metadata, `provenance check`."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from imagegen import samples
from imagegen.provenance import (
    IPTC_AI_GENERATED,
    check_image,
    embed_watermark,
    prompt_sha256,
    read_watermark,
    stamp,
    tag_for,
)

IMAGE_ID = "c0ffee11" + "0" * 24
METADATA = {"prompt": "a portrait", "seed": 7, "preset": "tiny-flux", "character": "mia", "method": "pulid-flux"}


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_watermark_survives_jpeg_85_at_512px():
    photo = samples.astronaut().convert("RGB")
    assert photo.size == (512, 512)
    marked, info = embed_watermark(photo, tag_for(IMAGE_ID))
    assert info["applied"] and info["bits"] == 48 and info["method"] == "dwtDctSvd"
    # invisible: PSNR well above 30 dB
    diff = np.asarray(marked, dtype=np.float64) - np.asarray(photo, dtype=np.float64)
    assert 10 * np.log10(255**2 / np.mean(diff**2)) > 32
    reading = read_watermark(jpeg(marked, 85))
    assert reading["found"] and reading["magic_bit_errors"] == 0
    assert reading["tag"] == IMAGE_ID[:8]
    # an unmarked photo does not read as marked
    assert not read_watermark(jpeg(photo, 85))["found"]


def test_watermark_on_other_photos_and_a_downscale():
    for photo in (samples.grace_hopper().convert("RGB").resize((512, 512)), samples.no_face_image().convert("RGB")):
        if min(photo.size) < 256:
            photo = photo.resize((512, 512))
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
    assert report["watermark"]["checked"] is False
    assert report["ai_generated"] is True


def test_stamp_writes_the_metadata_and_check_reads_both_back(tmp_path):
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
    # after a JPEG re-encode the metadata is gone but the watermark still says where it came from
    path = tmp_path / "shared.jpg"
    jpeg(image, 85).save(path, quality=85)
    report = check_image(path)
    assert report["metadata"]["present"] is False
    assert report["watermark"]["found"] and report["watermark"]["tag"] == IMAGE_ID[:8]
    assert report["ai_generated"] is True


def test_provenance_check_cli(tmp_path, isolated_home):
    from imagegen.cli import app
    from imagegen.serve.store import ServeStore

    photo = samples.astronaut().convert("RGB")
    png, _ = stamp(photo, METADATA, image_id=IMAGE_ID, request_id="req-cli")
    with ServeStore.open() as store:
        store.add_audit(
            [
                {
                    "image_id": IMAGE_ID,
                    "request_id": "req-cli",
                    "job_id": None,
                    "key_id": "k1",
                    "tenant": "default",
                    "preset": "tiny-flux",
                    "character": "mia",
                    "character_version": 1,
                    "method": "pulid-flux",
                    "prompt_sha256": "0" * 64,
                    "seed": 7,
                    "watermark_tag": tag_for(IMAGE_ID),
                }
            ]
        )
    path = tmp_path / "out.jpg"
    jpeg(Image.open(io.BytesIO(png)), 85).save(path, quality=85)
    result = CliRunner().invoke(app, ["provenance", "check", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["watermark"]["found"] and report["audit"][0]["request_id"] == "req-cli"
