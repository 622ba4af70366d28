"""Service outputs carry a signed C2PA manifest that validates with c2pa-python, and stops validating after
an edit of their pixels; `check_image` reaches the render's audit record for its own tenant only."""

from __future__ import annotations

import time

from imagegen.provenance import check_image, read_manifest
from imagegen.provenance.manifest import IPTC_AI_GENERATED
from imagegen.serve.store import ServeStore
from tests.provenance.edits import edit_png_pixels


def test_service_output_has_a_valid_manifest_that_an_edit_breaks(renderer_client, http):
    render = renderer_client.render(preset="tiny-flux", prompt="a portrait", seed=5, width=256, height=256, steps=2)
    image = render.images[0]
    manifest = read_manifest(image.png, "image/png")
    assert manifest["present"] and manifest["valid"] and manifest["failures"] == [], manifest
    # no IMAGEGEN_C2PA_CERT in the test session: the home's development signer, trusted by its own CA
    assert manifest["state"] == "Trusted" and manifest["signer"]["development"] is True
    assert manifest["digital_source_type"] == IPTC_AI_GENERATED
    assert manifest["request_id"] == render.request_id and manifest["image_id"] == image.info["image_id"]
    assert manifest["preset"] == "tiny-flux" and manifest["generator"]["name"] == "imagegen"
    assert image.info["metadata"]["provenance"]["c2pa"]["signer"] == "development"
    renderers = http.get("/readyz").json()["checks"]["renderers"]
    assert {r["c2pa_signer"] for r in renderers.values()} == {"development"}

    with ServeStore.open() as store:
        # the audit row is written behind the response (imagegen.serve.audit): it lands within moments
        deadline = time.monotonic() + 30
        while store.audit_for_image(image.info["image_id"]) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        mine = check_image(image.png, store, tenant="default")
        theirs = check_image(image.png, store, tenant="someone-else")
    assert mine["survived"] == ["manifest", "text_chunks", "watermark"]
    assert mine["audit_reached"] and mine["request_id"] == render.request_id
    assert theirs["audit"] == [] and not theirs["audit_reached"]

    broken = read_manifest(edit_png_pixels(image.png), "image/png")
    assert broken["present"] and not broken["valid"] and broken["state"] == "Invalid"
