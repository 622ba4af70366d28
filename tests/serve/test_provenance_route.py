"""`POST /v1/provenance/check`: a platform backend sends an image back and learns what its provenance
still says — every layer of a served file, the watermark alone once the metadata is stripped — and
reaches the request that made it for its own tenant only; bad bodies are refused in one JSON error."""

from __future__ import annotations

import io

from PIL import Image

from imagegen.client import ApiClientError, Client
from imagegen.serve.auth import create_key
from imagegen.serve.store import ServeStore
from tests.serve.conftest import assert_error_shape

CHECK = "/v1/provenance/check"


def _stripped(png: bytes) -> bytes:
    """The same pixels saved again without any metadata (what most platforms do to a PNG)."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_served_image_is_traced_to_its_request_for_its_tenant_only(service, renderer_client):
    render = renderer_client.render(preset="tiny-flux", prompt="a lighthouse", seed=9, width=256, height=256, steps=2)
    image = render.images[0]

    served = renderer_client.check_provenance(image.png)
    assert served["survived"] == ["manifest", "text_chunks", "watermark"]
    assert served["manifest"]["valid"] and served["signer"].startswith("development signer")
    assert served["audit_reached"] and served["request_id"] == render.request_id
    assert served["audit_tenant"] == "default" and served["audit"][0]["image_id"] == image.info["image_id"]

    stripped = renderer_client.check_provenance(_stripped(image.png))
    assert stripped["survived"] == ["watermark"] and stripped["metadata"]["present"] is False
    assert stripped["watermark"]["tag"] == image.info["image_id"][:8]
    assert stripped["audit_reached"] and stripped["request_id"] == render.request_id  # through the watermark

    with ServeStore.open() as store:
        outsider = create_key(store, "tests-provenance-outsider", ["render"], tenant="prov-outsider")[1]
    with Client(service.url, outsider) as other:
        theirs = other.check_provenance(image.png)
    assert theirs["watermark"]["found"] and theirs["audit"] == [] and not theirs["audit_reached"]
    assert theirs["request_id"] is None and theirs["audit_tenant"] == "prov-outsider"


def test_bad_bodies_and_missing_scopes_are_refused(http, keys):
    render = {"Authorization": f"Bearer {keys.render}"}
    png = {**render, "Content-Type": "image/png"}
    error = assert_error_shape(
        http.post(CHECK, content=b"hello", headers={**render, "Content-Type": "text/plain"}), 415
    )
    assert error["code"] == "unsupported_media_type"
    assert assert_error_shape(http.post(CHECK, content=b"", headers=png), 422)["code"] == "invalid_image"
    junk = assert_error_shape(http.post(CHECK, content=b"\x89PNG\r\n\x1a\nnot really", headers=png), 422)
    assert junk["code"] == "invalid_image"
    writer = {"Authorization": f"Bearer {keys.writer}", "Content-Type": "image/png"}
    assert_error_shape(http.post(CHECK, content=b"x", headers=writer), 403)  # needs the render scope
    assert_error_shape(http.post(CHECK, content=b"x", headers={"Content-Type": "image/png"}), 401)


def test_the_python_client_raises_the_api_error(renderer_client):
    try:
        renderer_client.check_provenance(b"GIF89a not an image at all", "image/png")
    except ApiClientError as exc:
        assert exc.status == 422 and exc.code == "invalid_image"
    else:
        raise AssertionError("a body that is no image was accepted")
