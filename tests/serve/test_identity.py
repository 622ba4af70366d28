"""Identity over HTTP: character renders, mixed characters in one batch, the consistency gate."""

from __future__ import annotations

import io
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from imagegen.client import ApiClientError, Client
from imagegen.faces import centroid, get_analyzer
from imagegen.serve.actors import request_tag
from imagegen.serve.gate import GateScorer
from tests.photos import astronaut_set, hopper_set
from tests.serve.conftest import wait_ready

SYNTHETIC = {"kind": "synthetic", "creator": "serve-tests"}


@pytest.fixture(scope="module")
def characters(service, keys):
    with Client(service.url, keys.writer) as writer:
        for character_id, files in (("serve-mia", astronaut_set(4)), ("serve-grace", hopper_set(3))):
            writer.create_character(character_id, character_id, list(files), SYNTHETIC)
            writer.approve_character(character_id)
        yield ["serve-mia", "serve-grace"]
        for character_id in ("serve-mia", "serve-grace"):
            writer.delete_character(character_id)


def metric(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_render_a_character(characters, renderer_client):
    render = renderer_client.render(prompt="mia at a cafe", character="serve-mia", seed=5, identity_weight=0.8)
    image = render.images[0]
    assert render.raw["character"] == "serve-mia" and render.raw["character_version"] == 2
    assert image.info["metadata"]["character"] == "serve-mia"
    assert image.info["metadata"]["method"]
    text = Image.open(io.BytesIO(image.png)).text
    assert text["character"] == "serve-mia" and text["character_version"] == "2" and text["method"]
    plain = renderer_client.render(prompt="mia at a cafe", seed=5)
    a = np.asarray(Image.open(io.BytesIO(image.png)), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(plain.images[0].png)), dtype=np.int16)
    assert np.abs(a - b).sum() > 0  # the identity changed the picture
    with pytest.raises(ApiClientError) as info:
        renderer_client.render(prompt="x", character="serve-mia", method="no-such-method")
    assert info.value.status == 422


def test_mixed_characters_share_one_batch(service, keys, characters, admin):
    """Requests for different characters (and none) queued together go through one pipeline call.

    A long render keeps the renderer busy while the three arrive, so they queue and form the next
    batch together (a request that finds the replica idle renders at once, alone: adaptive batching).
    """
    bodies = [
        {"preset": "tiny-flux", "prompt": "a cafe", "seed": 1, "character": "serve-mia"},
        {"preset": "tiny-flux", "prompt": "a park", "seed": 2, "character": "serve-grace"},
        {"preset": "tiny-flux", "prompt": "a street", "seed": 3},
    ]
    before = metric(admin.metrics(), 'imagegen_mixed_character_batches_total{preset="tiny-flux"}')
    blocker_id = f"mixed-blocker-{uuid.uuid4().hex[:8]}"
    statuses: list[int] = []

    def post(body: dict, extra: dict | None = None) -> None:
        headers = {"Authorization": f"Bearer {keys.render}", **(extra or {})}
        with httpx.Client(base_url=service.url, timeout=180) as http:
            statuses.append(http.post("/v1/renders", json=body, headers=headers).status_code)

    hold = {"preset": "tiny-flux", "prompt": "hold the renderer", "seed": 9, "steps": 50}
    blocker = threading.Thread(target=post, args=(hold, {"X-Request-Id": blocker_id}))
    blocker.start()
    deadline = time.monotonic() + 120
    while True:  # until the long render is in the pipeline
        rendering = wait_ready(service.url)["checks"]["renderers"]["tiny-flux"]["rendering"]
        if rendering is not None and request_tag(blocker_id) in rendering["requests"]:
            break
        assert time.monotonic() < deadline, "the long render never started"
        time.sleep(0.1)
    threads = [threading.Thread(target=post, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in [blocker, *threads]:
        t.join()
    assert statuses == [200] * 4
    after = metric(admin.metrics(), 'imagegen_mixed_character_batches_total{preset="tiny-flux"}')
    assert after > before, "characters never shared a batch"
    assert 'imagegen_batch_characters_bucket{le="2.0",preset="tiny-flux"}' in admin.metrics()


def test_consistency_gate_reports_every_attempt(characters, renderer_client, admin):
    """The tiny models draw noise, so no face is found: every attempt is scored (None) and reported."""
    before = metric(admin.metrics(), 'imagegen_gate_retries_total{preset="tiny-flux"}')
    render = renderer_client.render(
        prompt="mia portrait",
        character="serve-mia",
        seed=100,
        num_images=2,
        min_identity_similarity=0.5,
        max_attempts=3,
    )
    for index, image in enumerate(render.images):
        gate = image.info["gate"]
        assert gate["min_identity_similarity"] == 0.5 and gate["backend"] == "dlib"
        assert [a["seed"] for a in gate["attempts"]] == [100 + index, 102 + index, 104 + index]
        assert all(a["similarity"] is None and not a["passed"] for a in gate["attempts"])
        assert gate["passed"] is False and gate["winning_seed"] == image.seed
    after = metric(admin.metrics(), 'imagegen_gate_retries_total{preset="tiny-flux"}')
    assert after - before == 4
    # the gate needs a character, and a character needs a centroid
    with pytest.raises(ApiClientError) as info:
        renderer_client.render(prompt="x", min_identity_similarity=0.5)
    assert info.value.field == "min_identity_similarity"


def test_gate_on_a_job(characters, renderer_client):
    job = renderer_client.submit_job(
        prompt="grace", character="serve-grace", seed=7, min_identity_similarity=0.4, max_attempts=2
    )
    done = renderer_client.wait_job(job["job_id"])
    assert done["status"] == "done"
    gate = done["result"]["images"][0]["gate"]
    assert [a["seed"] for a in gate["attempts"]] == [7, 8]


def test_gate_scorer_on_real_photos():
    """The scorer the gate uses, on photos that do have faces: same person high, another person low."""
    analyzer = get_analyzer()
    faces = [analyzer.largest(Image.open(io.BytesIO(data)).convert("RGB")).face for _, data in astronaut_set(4)]
    center = centroid([f for f in faces if f is not None], "dlib")
    scorer = GateScorer("dlib")
    same = scorer.score(Image.open(io.BytesIO(astronaut_set(6)[5][1])), center)
    other = scorer.score(Image.open(io.BytesIO(hopper_set(1)[0][1])), center)
    assert same is not None and other is not None
    assert same >= scorer.default_threshold > other
