"""A render cancelled (DELETE of its job) or abandoned (client hung up) stops between denoising steps.

Observed on the real service: the renderer replica's health (in ``/readyz``) reports the render it
is working on (request ids, step) and the last cancellations with the steps each ran before it
left its pipeline call; the ingress counts ``imagegen_renders_cancelled_total``. Assertions are on
step counts, not on wall time; the waits only bound how long a broken service may take to fail.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from urllib.parse import urlparse

import httpx

from imagegen.serve.actors import request_tag
from tests.serve.conftest import cancelled_total, wait_ready

STEPS = 50  # the tiny presets' max_steps: a render long enough to be caught in the middle


def renderer_health(url: str, preset: str) -> dict:
    return wait_ready(url)["checks"]["renderers"][preset]


def wait_for(what: str, check, timeout_s: float = 120.0, poll_s: float = 0.1):
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(poll_s)
    raise AssertionError(f"gave up waiting for {what}")


def cancel_record(url: str, preset: str, request_id: str) -> dict | None:
    """The renderer's record of ``request_id``'s cancellation (health names requests by tag)."""
    records = renderer_health(url, preset)["recent_cancels"]
    return next((r for r in records if r["request"] == request_tag(request_id)), None)


def test_a_deleted_job_stops_its_render_and_frees_the_renderer(service, keys, renderer_client, admin):
    preset = "tiny-flux"
    before = cancelled_total(admin.metrics(), preset)
    request_id = f"deleted-{uuid.uuid4().hex[:12]}"
    submitted = httpx.post(
        f"{service.url}/v1/jobs",
        json={"preset": preset, "prompt": "cancel me", "seed": 8101, "steps": STEPS, "width": 128, "height": 128},
        headers={"Authorization": f"Bearer {keys.render}", "X-Request-Id": request_id},
        timeout=60,
    )
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    steps_seen: list[int] = []
    kinds: list[str] = []
    for event in renderer_client.events(job["job_id"]):
        kinds.append(event.type)
        if event.type == "progress":
            steps_seen.append(event.data["step"])
            if len(steps_seen) == 1:
                assert renderer_client.cancel_job(job["job_id"])["status"] == "cancelled"
    assert kinds[-1] == "cancelled" and steps_seen, kinds
    assert max(steps_seen) < STEPS, steps_seen  # the job's progress stopped before its last step
    final = renderer_client.get_job(job["job_id"])
    assert final["status"] == "cancelled" and final["result"] is None

    # the renderer dropped the request between steps: its pipeline call stopped early
    found = wait_for(
        "the renderer to report the cancelled render", lambda: cancel_record(service.url, preset, request_id)
    )
    assert found["steps"] == STEPS and found["steps_run"] < STEPS, found
    # and it is free: the next render on it completes
    after = renderer_client.render(preset=preset, prompt="after the cancel", seed=8102, steps=2)
    assert after.images[0].png
    assert cancelled_total(admin.metrics(), preset) >= before + 1


def test_an_abandoned_sync_render_stops_between_steps(service, keys, admin):
    preset = "tiny-sdxl"
    before = cancelled_total(admin.metrics(), preset)
    request_id = f"abandoned-{uuid.uuid4().hex[:12]}"
    body = json.dumps(
        {"preset": preset, "prompt": "nobody waits for me", "seed": 8201, "steps": STEPS, "width": 128, "height": 128}
    ).encode()
    url = urlparse(service.url)
    request = (
        f"POST /v1/renders HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\n"
        f"Authorization: Bearer {keys.render}\r\nX-Request-Id: {request_id}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection((url.hostname, url.port)) as client:
        client.sendall(request)

        def rendering() -> dict | None:
            now = renderer_health(service.url, preset)["rendering"]
            return now if now is not None and request_tag(request_id) in now["requests"] and now["step"] >= 1 else None

        started = wait_for("the render to start on the renderer", rendering)
        assert started["steps"] == STEPS
    # the client hung up mid-render: the renderer drops the request at its next step
    found = wait_for(
        "the renderer to report the abandoned render", lambda: cancel_record(service.url, preset, request_id)
    )
    assert found["steps"] == STEPS and started["step"] <= found["steps_run"] < STEPS, (started, found)
    assert cancelled_total(admin.metrics(), preset) >= before + 1
    health = renderer_health(service.url, preset)
    assert health["rendering"] is None or request_tag(request_id) not in health["rendering"]["requests"]
