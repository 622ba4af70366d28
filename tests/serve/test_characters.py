"""The character lifecycle over HTTP: register (multipart) -> list -> get -> approve -> render -> delete."""

from __future__ import annotations

import pytest

from imagegen.client import ApiClientError, Client
from tests.photos import astronaut_set, hopper_set, no_face
from tests.serve.conftest import assert_error_shape

SYNTHETIC = {"kind": "synthetic", "creator": "serve-tests"}


@pytest.fixture(scope="module")
def writer(service, keys):
    with Client(service.url, keys.writer) as client:
        yield client


def test_character_lifecycle(writer, renderer_client):
    created = writer.create_character(
        "lifecycle-ava", "Ava", list(astronaut_set(4)), SYNTHETIC, card={"look": "short dark hair"}
    )
    assert created["character"]["id"] == "lifecycle-ava"
    assert created["character"]["status"] == "draft"
    assert created["report"]["verdict"] == "pass" and len(created["report"]["images"]) == 4
    assert created["character"]["centroid_backends"] == ["dlib"]

    with pytest.raises(ApiClientError) as info:
        writer.create_character("lifecycle-ava", "Ava again", list(astronaut_set(2)), SYNTHETIC)
    assert info.value.status == 409 and info.value.code == "duplicate_character"

    listed = {c["id"]: c for c in writer.list_characters()}
    assert listed["lifecycle-ava"]["status"] == "draft" and listed["lifecycle-ava"]["references"] == 4
    assert "lifecycle-ava" not in {c["id"] for c in writer.list_characters(status="approved")}
    full = renderer_client.get_character("lifecycle-ava")  # reading needs any key
    assert full["card"]["look"] == "short dark hair"
    assert all("embedding" not in face for ref in full["references"] for face in ref["faces"].values())

    with pytest.raises(ApiClientError) as info:  # drafts are not rendered
        renderer_client.render(prompt="ava at a cafe", character="lifecycle-ava", seed=1)
    assert info.value.status == 409 and info.value.code == "character_not_renderable"

    approved = writer.approve_character("lifecycle-ava")
    assert approved["character"]["status"] == "approved" and approved["character"]["version"] == 2

    deleted = writer.delete_character("lifecycle-ava")["deleted"]
    assert deleted["character_id"] == "lifecycle-ava" and deleted["references"] == 4
    for call in (lambda: writer.get_character("lifecycle-ava"), lambda: writer.delete_character("lifecycle-ava")):
        with pytest.raises(ApiClientError) as info:
            call()
        assert info.value.status == 404 and info.value.code == "unknown_character"


def test_registration_refusals(service, keys, writer, http):
    headers = {"Authorization": f"Bearer {keys.writer}"}
    # a face-less reference set and a mixed-identity set are registered as drafts whose report fails,
    # and approval is refused
    created = writer.create_character("mixed-set", "Mixed", [*astronaut_set(3), *hopper_set(2)], SYNTHETIC)
    assert created["report"]["verdict"] == "fail"
    with pytest.raises(ApiClientError) as info:
        writer.approve_character("mixed-set")
    assert info.value.status == 409 and info.value.code == "approval_refused"
    writer.delete_character("mixed-set")
    # not an image at all
    response = http.post(
        "/v1/characters",
        headers=headers,
        data={"id": "junk", "name": "Junk", "provenance": '{"kind": "synthetic", "creator": "x"}'},
        files=[("references", ("a.png", b"this is not a png", "image/png"))],
    )
    assert assert_error_shape(response, 422)["code"] == "invalid_image"
    # consented without evidence
    response = http.post(
        "/v1/characters",
        headers=headers,
        data={"id": "noevidence", "name": "N", "provenance": '{"kind": "consented", "creator": "x"}'},
        files=[("references", no_face())],
    )
    assert assert_error_shape(response, 422)["code"] == "invalid_provenance"
    # provenance that is not JSON, a bad id, a missing file part
    base = {"id": "x1", "name": "X", "provenance": "{not json"}
    response = http.post("/v1/characters", headers=headers, data=base, files=[("references", no_face())])
    assert assert_error_shape(response, 422)["field"] == "provenance"
    response = http.post(
        "/v1/characters",
        headers=headers,
        data={**base, "id": "../../etc", "provenance": '{"kind": "synthetic", "creator": "x"}'},
        files=[("references", no_face())],
    )
    assert assert_error_shape(response, 422)["code"] == "invalid_character_id"
    response = http.post("/v1/characters", headers=headers, data=base)
    assert assert_error_shape(response, 422)["code"] == "validation_error"
    # uploads over the route's limit: 413 before anything is parsed
    big = ("big.png", b"\0" * (17 * 1024 * 1024), "image/png")
    response = http.post("/v1/characters", headers=headers, data=base, files=[("references", big)])
    assert assert_error_shape(response, 413)["code"] == "payload_too_large"
    assert http.get("/healthz").status_code == 200


def test_service_demo_against_the_running_service(service, keys, tmp_path):
    """The demo's service part (register, render sync and as a job with SSE progress, provenance)."""
    from imagegen import samples
    from imagegen.demo.service import run_service_demo

    lines: list[str] = []
    files, provenance = samples.reference_files("astronaut"), samples.provenance("astronaut")
    written = run_service_demo(tmp_path, files, provenance, url=service.url, api_key=keys.admin, log=lines.append)
    assert {"sync seed 7", "sync seed 8", "job seed 11", "provenance check"} <= set(written)
    assert all(path.exists() for path in written.values())
    assert any("step" in line for line in lines) and any("done" in line for line in lines)
