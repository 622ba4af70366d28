"""The HTTP API against a real local Ray cluster: health, docs, auth, renders, jobs, SSE, metrics."""

from __future__ import annotations

import base64
import io
import json
import os
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from imagegen.client import ApiClientError, Client, parse_sse
from imagegen.images import RECORD_KEY
from imagegen.provenance import read_watermark
from imagegen.serve.http.timing import parse_header
from imagegen.serve.store import ServeStore
from tests.serve.conftest import assert_error_shape, in_threads


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- health and docs ---------------------------------------------------------------------------------
def test_health_routes_need_no_key(http):
    assert http.get("/healthz").json()["status"] == "ok"
    ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["database"] == "ok" and checks["storage"] == "ok"
    assert set(checks["renderers"]) == {"tiny-flux", "tiny-sdxl"}
    assert all(r["ok"] for r in checks["renderers"].values())
    assert "x-request-id" in ready.headers
    # the session's Ray was started by the launcher, as `imagegen serve` starts one: its replicas run Ray Serve's
    # throughput-optimised data plane (unless whoever runs the tests turned it off), without direct ingress ports
    optimized = os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert checks["data_plane"] == {
        "throughput_optimized": optimized,
        "grpc_between_deployments": optimized,
        "user_code_on_replica_loop": optimized,
        "direct_ingress": False,
        "logs_to_stderr": True,
    }


def test_openapi_and_docs_need_a_key(http, keys):
    assert_error_shape(http.get("/openapi.json"), 401)
    assert_error_shape(http.get("/docs"), 401)
    spec = http.get("/openapi.json", headers=bearer(keys.render)).json()
    for path in ("/v1/renders", "/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/characters", "/metrics"):
        assert path in spec["paths"], path
    assert "HTTPBearer" in json.dumps(spec["components"]["securitySchemes"])
    docs = http.get("/docs", headers=bearer(keys.render))
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# -- auth --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/renders"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/characters"),
        ("POST", "/v1/characters"),
        ("DELETE", "/v1/characters/mia"),
        ("GET", "/metrics"),
        ("GET", "/v1/no-such-route"),
    ],
)
def test_every_route_but_health_needs_a_key(http, method, path):
    response = http.request(method, path, json={"prompt": "x"})
    error = assert_error_shape(response, 401)
    assert error["code"] == "unauthorized"
    assert response.headers.get("www-authenticate") == "Bearer"


def test_wrong_malformed_and_revoked_keys_are_refused(http, keys):
    body = {"prompt": "x", "seed": 1}
    wrong_secret = keys.render[:-4] + ("AAAA" if not keys.render.endswith("AAAA") else "BBBB")
    for token in (wrong_secret, "igk_000000000000_" + "A" * 43, "not-a-key", "igk_" + "x" * 200):
        assert_error_shape(http.post("/v1/renders", json=body, headers=bearer(token)), 401)
    assert_error_shape(http.post("/v1/renders", json=body, headers={"X-API-Key": wrong_secret}), 401)
    # revoke a working key: refused from then on (the test config caches keys for 0 s)
    from imagegen.serve.auth import create_key, revoke_key

    with ServeStore.open() as store:
        record, plaintext = create_key(store, "to-revoke", ["render"])
        assert http.get("/v1/jobs", headers=bearer(plaintext)).status_code == 200
        assert http.get("/v1/jobs", headers={"X-API-Key": plaintext}).status_code == 200
        revoke_key(store, record.id)
    assert_error_shape(http.get("/v1/jobs", headers=bearer(plaintext)), 401)


def test_scopes(http, keys):
    render_body = {"prompt": "a cafe", "seed": 1}
    error = assert_error_shape(http.post("/v1/renders", json=render_body, headers=bearer(keys.writer)), 403)
    assert error["code"] == "forbidden" and "render" in error["message"]
    assert_error_shape(http.post("/v1/jobs", json=render_body, headers=bearer(keys.writer)), 403)
    assert_error_shape(http.delete("/v1/characters/anyone", headers=bearer(keys.render)), 403)
    assert_error_shape(http.post("/v1/characters/anyone/approve", headers=bearer(keys.render)), 403)
    assert_error_shape(http.get("/metrics", headers=bearer(keys.render)), 403)
    # reading characters needs any key; admin can do everything
    assert http.get("/v1/characters", headers=bearer(keys.render)).status_code == 200
    assert http.get("/v1/characters", headers=bearer(keys.writer)).status_code == 200
    assert http.get("/metrics", headers=bearer(keys.admin)).status_code == 200
    assert http.post("/v1/renders", json=render_body, headers=bearer(keys.admin)).status_code == 200


# -- synchronous renders -----------------------------------------------------------------------------
def server_timing(response: httpx.Response) -> dict[str, float]:
    """The ``Server-Timing`` header as {phase: milliseconds}."""
    return parse_header(response.headers["server-timing"])


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


@pytest.mark.parametrize("preset", ["tiny-flux", "tiny-sdxl"])
def test_sync_render_json(renderer_client, preset):
    render = renderer_client.render(preset=preset, prompt="a woman at a cafe at night", seed=40, num_images=2)
    assert [image.seed for image in render.images] == [40, 41]
    for index, image in enumerate(render.images):
        pil = decode(image.png)
        assert pil.size == (64, 64)
        text = pil.text
        assert text["ai_generated"] == "true"
        assert text["request_id"] == render.request_id
        assert text["image_id"] == image.info["image_id"]
        assert text["preset"] == preset and text["seed"] == str(40 + index)
        record = json.loads(text[RECORD_KEY])
        assert record["provenance"]["watermark"]["exempt"] is True  # 64 px: under 256 px
        assert json.loads(text["watermark"])["exempt"] is True
        assert image.info["watermark"]["exempt"] is True
        assert image.info["metadata"]["preset"] == preset
        timings = image.info["metadata"]["timings"]  # where the request's time went, in the replica
        assert timings["total_s"] > 0 and timings["stamp_s"] > 0
    assert render.raw["timings"]["total_s"] > 0


def test_same_seed_same_image_and_png_response(renderer_client, service, keys):
    first = renderer_client.render(prompt="a park in autumn", seed=7, steps=3)
    second = renderer_client.render(prompt="a park in autumn", seed=7, steps=3)
    a, b = (np.asarray(decode(r.images[0].png)) for r in (first, second))
    assert np.array_equal(a, b)
    png, headers = renderer_client.render_png(prompt="a park in autumn", seed=7, steps=3)
    assert headers["content-type"] == "image/png" and headers["x-seed"] == "7"
    assert np.array_equal(np.asarray(decode(png)), a)
    with httpx.Client(base_url=service.url, headers=bearer(keys.render), timeout=60) as http:
        response = http.post("/v1/renders?format=png", json={"prompt": "a park in autumn", "seed": 7, "steps": 3})
        assert response.headers["content-type"] == "image/png"
        assert np.array_equal(np.asarray(decode(response.content)), a)
        # where the time went (Server-Timing), each phase measured where it ran
        phases = server_timing(response)
        for name in ("auth", "body", "parse", "ingress", "renderer", "hops", "queue", "render", "stamp", "respond"):
            assert phases[name] >= 0, name
        assert phases["render"] + phases["stamp"] < phases["renderer"] < phases["total"]
        assert sum(v for k, v in phases.items() if k not in ("total", "hops", "queue", "render", "stamp")) == (
            pytest.approx(phases["total"], abs=0.5)
        )
        refused = http.post("/v1/renders", json={"prompt": "x", "steps": 0})
        assert refused.status_code == 422 and {"auth", "body", "route"} <= set(server_timing(refused))
        error = assert_error_shape(http.post("/v1/renders?format=png", json={"prompt": "x", "num_images": 2}), 406)
        assert error["field"] == "format"


def test_256px_render_is_watermarked_and_reads_back(renderer_client):
    render = renderer_client.render(prompt="a portrait", seed=3, width=256, height=256, steps=2)
    image = render.images[0]
    assert image.info["watermark"]["applied"] is True
    reading = read_watermark(decode(image.png).convert("RGB"))
    assert reading["found"] and reading["tag"] == image.info["image_id"][:8]


def test_requests_from_different_clients_share_batches(service, keys, admin):
    def batch_metrics() -> tuple[float, float]:
        text = admin.metrics()
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith('imagegen_batch_size_sum{preset="tiny-sdxl"}'):
                total = float(line.split()[-1])
            if line.startswith('imagegen_batch_size_count{preset="tiny-sdxl"}'):
                count = float(line.split()[-1])
        return total, count

    before = batch_metrics()
    statuses: list[int] = []

    def one(i: int) -> None:
        with httpx.Client(base_url=service.url, headers=bearer(keys.render), timeout=120) as http:
            statuses.append(
                http.post("/v1/renders", json={"preset": "tiny-sdxl", "prompt": f"prompt {i}", "seed": i}).status_code
            )

    in_threads(one, 4)
    assert statuses == [200] * 4
    after = batch_metrics()
    requests, batches = after[0] - before[0], after[1] - before[1]
    assert requests == 4
    assert batches < 4, "four concurrent requests never shared a pipeline batch"


# -- jobs and SSE ------------------------------------------------------------------------------------
def test_job_lifecycle_with_sse_progress(renderer_client):
    job = renderer_client.submit_job(prompt="a street in the rain", seed=11, num_images=2, steps=6)
    assert job["status"] == "queued" and len(job["job_id"]) == 32
    events = list(renderer_client.events(job["job_id"]))
    kinds = [e.type for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "done", kinds
    progress = [e.data for e in events if e.type == "progress"]
    assert progress, kinds
    assert all(1 <= p["step"] <= p["steps"] == 6 for p in progress)
    assert progress[-1]["images_done"] == 2
    ids = [e.id for e in events]
    assert ids == sorted(ids)
    done = renderer_client.wait_job(job["job_id"])
    assert done["status"] == "done" and done["attempts"] == 1
    images = Client.job_images(done)
    assert [i.seed for i in images] == [11, 12]
    assert decode(images[0].png).text["ai_generated"] == "true"
    png = renderer_client.job_image(job["job_id"], 1)
    assert png == images[1].png
    # resuming the stream after the last event id only replays what came after
    tail = list(renderer_client.events(job["job_id"], last_event_id=ids[-2]))
    assert [e.type for e in tail] == ["done"]
    assert any(j["job_id"] == job["job_id"] for j in renderer_client.list_jobs())


def test_jobs_belong_to_their_key(service, keys, renderer_client):
    job = renderer_client.submit_job(prompt="private", seed=1)
    with Client(service.url, keys.other_render) as other:
        with pytest.raises(ApiClientError) as info:
            other.get_job(job["job_id"])
        assert info.value.status == 404 and info.value.code == "unknown_job"
        with pytest.raises(ApiClientError):
            other.cancel_job(job["job_id"])
    with Client(service.url, keys.admin) as admin:
        assert admin.get_job(job["job_id"])["job_id"] == job["job_id"]
    renderer_client.wait_job(job["job_id"])


def test_cancel_a_job(renderer_client):
    job = renderer_client.submit_job(prompt="a slow one", seed=2, num_images=4, steps=40)
    cancelled = renderer_client.cancel_job(job["job_id"])
    assert cancelled["status"] == "cancelled"
    events = list(renderer_client.events(job["job_id"]))
    assert events[-1].type == "cancelled"
    time.sleep(0.5)
    assert renderer_client.get_job(job["job_id"])["status"] == "cancelled"
    done = renderer_client.submit_job(prompt="quick", seed=3)
    finished = renderer_client.wait_job(done["job_id"])
    with pytest.raises(ApiClientError) as info:
        renderer_client.cancel_job(finished["job_id"])
    assert info.value.status == 409 and info.value.code == "job_finished"


def test_sse_wire_format(service, keys, renderer_client):
    job = renderer_client.submit_job(prompt="wire format", seed=5)
    with httpx.Client(base_url=service.url, headers=bearer(keys.render), timeout=60) as http:
        with http.stream("GET", f"/v1/jobs/{job['job_id']}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = list(response.iter_lines())
    assert lines[0].startswith("id: ") and lines[1] == "event: queued" and lines[2].startswith("data: {")
    events = list(parse_sse(iter(lines)))
    assert events[-1].type == "done" and events[-1].data["job_id"] == job["job_id"]


# -- metrics -----------------------------------------------------------------------------------------
def test_metrics(admin, renderer_client):
    renderer_client.render(prompt="for the metrics", seed=9)
    text = admin.metrics()
    for name in (
        "imagegen_http_requests_total",
        "imagegen_http_request_duration_seconds_bucket",
        "imagegen_batch_size_bucket",
        "imagegen_queue_depth",
        "imagegen_images_rendered_total",
        "imagegen_gate_retries_total",
        "imagegen_jobs",
    ):
        assert name in text, name
    assert 'imagegen_http_requests_total{method="POST",route="/v1/renders",status="200"}' in text
    assert 'imagegen_images_rendered_total{preset="tiny-flux"}' in text


# -- base64 in JSON is the same PNG as the binary one --------------------------------------------------
def test_json_png_is_valid_base64(service, keys):
    with httpx.Client(base_url=service.url, headers=bearer(keys.render), timeout=60) as http:
        data = http.post("/v1/renders", json={"prompt": "x", "seed": 1, "steps": 1}).json()
    png = base64.b64decode(data["images"][0]["png_base64"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
