"""``/v1/designs`` against the session's real service (Ray Serve, tiny-flux, SQLite): the design flow
through the API with SSE progress, an uploaded photo as the pick, `synthetic` refused and `licensed`
accepted, a kept image re-rendered from its recipe within the stated tolerance, and the hostile cases
(another tenant's design, pick out of range, not an image, huge counts, expiry, delete)."""

from __future__ import annotations

import io
import json
import time
import uuid
from datetime import timedelta

import httpx
import pytest
from PIL import Image

from imagegen import samples
from imagegen.client import parse_sse
from imagegen.db import utcnow
from imagegen.identity.design.store import DesignStore
from imagegen.identity.design.verify import difference, rerender
from imagegen.serve.auth import create_key
from imagegen.serve.store import ServeStore
from imagegen.settings import get_settings
from tests.photos import encode, hopper_set
from tests.serve.conftest import assert_error_shape

LICENSED = {"kind": "licensed", "who": "NASA", "evidence": "public domain (NASA portrait)"}


@pytest.fixture(scope="module")
def design_keys(service):
    with ServeStore.open() as store:
        return {
            "writer": create_key(store, "design-writer", ["characters:write"], tenant="studio-a")[1],
            "reader": create_key(store, "design-reader", ["render"], tenant="studio-a")[1],
            "other": create_key(store, "design-other", ["characters:write"], tenant="studio-b")[1],
        }


def client(service, key: str) -> httpx.Client:
    return httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def follow(api: httpx.Client, design_id: str) -> list:
    """The design's current job's events until it ends."""
    with api.stream("GET", f"/v1/designs/{design_id}/events") as response:
        assert response.status_code == 200, response.read()
        events = list(parse_sse(response.iter_lines()))
    assert events[-1].type == "done", [(e.type, e.data) for e in events[-3:]]
    return events


def ready(api: httpx.Client, design_id: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        design = api.get(f"/v1/designs/{design_id}").json()
        if design["status"] != "rendering":
            return design
        time.sleep(0.2)
    raise AssertionError(f"design {design_id} still rendering")


def new_design(api: httpx.Client, candidates: int = 1, **extra) -> dict:
    body = {
        "character_id": f"design-{uuid.uuid4().hex[:10]}",
        "name": "Mia",
        "preset": "tiny-flux",
        "card": {"look": "short silver hair", "style_notes": "studio photo"},
        "candidates": candidates,
        "seed": 3,
        **extra,
    }
    response = api.post("/v1/designs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def upload(api: httpx.Client, design_id: str, data: bytes, provenance: dict, name: str = "astronaut.jpg"):
    return api.post(
        f"/v1/designs/{design_id}/pick",
        files={"image": (name, data, "image/jpeg")},
        data={"provenance": json.dumps(provenance)},
    )


def png_of(api: httpx.Client, design_id: str, image_id: str) -> Image.Image:
    response = api.get(f"/v1/designs/{design_id}/images/{image_id}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content)).convert("RGB")


def test_design_flow_through_the_api(service, keys, design_keys):
    photo = encode(samples.astronaut(), "JPEG", quality=90)
    with client(service, design_keys["writer"]) as api:
        started = new_design(api, candidates=2)
        assert started["stage"] == "describe" and started["status"] == "rendering" and started["job_id"]
        events = follow(api, started["design_id"])
        kinds = [e.type for e in events]
        assert kinds[0] == "queued" and "started" in kinds and "progress" in kinds
        progress = [e.data for e in events if e.type == "progress"]
        assert progress[-1]["images_total"] == 2 and progress[-1]["steps"] >= 1

        design = ready(api, started["design_id"])
        design_id = design["design_id"]
        assert design["status"] == "ready" and [c["seed"] for c in design["candidates"]] == [3, 4]
        assert all(c["face"]["found"] is False and c["face"]["note"] == "no face" for c in design["candidates"])
        assert png_of(api, design_id, design["candidates"][0]["image_id"]).size == (64, 64)

        picked = upload(api, design_id, photo, LICENSED)
        assert picked.status_code == 200, picked.text
        pick = picked.json()["pick"]
        assert (
            picked.json()["stage"] == "pick" and pick["source"] == "upload" and pick["provenance"]["kind"] == "licensed"
        )

        turned = api.post(f"/v1/designs/{design_id}/turnaround", json={"grid": "quick"})
        assert turned.status_code == 202 and turned.json()["status"] == "rendering", turned.text
        assert any(e.type == "progress" and e.data["images_total"] == 3 for e in follow(api, design_id))
        design = ready(api, design_id)
        assert design["stage"] == "curate" and design["status"] == "ready", design["error"]
        assert [s["view"] for s in design["slots"]] == ["front", "three_quarter_left", "profile"]
        assert [s["analysable"] for s in design["slots"]] == [True, True, False]
        assert design["report"]["verdict"] == "fail" and design["report"]["unanalysable"] == [2]

        curated = api.post(f"/v1/designs/{design_id}/curate", json={"drop": [1], "reroll": [0]})
        assert curated.status_code == 202, curated.text
        follow(api, design_id)
        after = ready(api, design_id)
        assert [s["kept"] for s in after["slots"]] == [True, False, True]
        assert after["slots"][0]["seed"] != design["slots"][0]["seed"] and after["report"]["kept"] == 2

        refused = api.post(f"/v1/designs/{design_id}/register", json={"provenance": {"kind": "synthetic", "who": "me"}})
        error = assert_error_shape(refused, 422)
        assert error["code"] == "synthetic_not_allowed" and "starts from an upload" in error["message"]
        registered = api.post(f"/v1/designs/{design_id}/register", json={"provenance": LICENSED})
        assert registered.status_code == 201, registered.text
        character = registered.json()["character"]
        assert character["status"] == "draft" and character["provenance"]["kind"] == "licensed"
        assert character["references"] == 2

        # the provenance recipe re-renders a kept image within the stated tolerance
        stored = api.get(f"/v1/characters/{character['id']}").json()
        recipe = stored["card"]["extra"]["design"]["references"][0]["recipe"]
        parent = png_of(api, design_id, pick["image_ids"][0])
        again = rerender(recipe, [parent])
        kept = png_of(api, design_id, after["slots"][0]["image_id"])
        diff = difference(again, kept)
        assert diff.within_tolerance, diff
        # the tolerance tells images apart: the same recipe with the next seed is far outside it
        assert not difference(rerender({**recipe, "seed": recipe["seed"] + 1}, [parent]), kept).within_tolerance

        folder = get_settings().home / "designs" / design_id
        assert folder.exists()
        deleted = api.delete(f"/v1/designs/{design_id}")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["deleted"]["images"] >= 5 and deleted.json()["deleted"]["jobs"] == 3
        assert not folder.exists()
        for path in (f"/v1/designs/{design_id}", f"/v1/designs/{design_id}/images/{pick['image_ids'][0]}"):
            assert assert_error_shape(api.get(path), 404)["code"] == "not_found"
        with client(service, keys.admin) as admin:  # its jobs went with it
            assert admin.get(f"/v1/jobs/{started['job_id']}").status_code == 404
        assert api.get(f"/v1/characters/{character['id']}").status_code == 200  # the character stays


def test_design_hostile_cases(service, keys, design_keys):
    with (
        client(service, design_keys["writer"]) as api,
        client(service, design_keys["other"]) as other,
        client(service, design_keys["reader"]) as reader,
    ):
        started = new_design(api)
        design_id = started["design_id"]
        follow(api, design_id)
        design = ready(api, design_id)

        # another tenant's design does not exist for it, whatever it asks
        for method, path, kwargs in (
            ("GET", f"/v1/designs/{design_id}", {}),
            ("GET", f"/v1/designs/{design_id}/events", {}),
            ("GET", f"/v1/designs/{design_id}/images/{design['candidates'][0]['image_id']}", {}),
            ("POST", f"/v1/designs/{design_id}/pick", {"json": {"candidates": [0]}}),
            ("POST", f"/v1/designs/{design_id}/turnaround", {"json": {}}),
            ("POST", f"/v1/designs/{design_id}/curate", {"json": {"drop": [0]}}),
            ("POST", f"/v1/designs/{design_id}/register", {"json": {"provenance": LICENSED}}),
            ("DELETE", f"/v1/designs/{design_id}", {}),
        ):
            assert assert_error_shape(other.request(method, path, **kwargs), 404)["code"] == "not_found", path
        assert design_id not in [d["design_id"] for d in other.get("/v1/designs").json()["designs"]]
        # a key of the tenant without characters:write reads but does not write
        assert reader.get(f"/v1/designs/{design_id}").status_code == 200
        assert_error_shape(reader.post(f"/v1/designs/{design_id}/pick", json={"candidates": [0]}), 403)

        for body, code in (
            ({"candidates": [5]}, "invalid_pick"),
            ({"candidates": []}, "validation_error"),
            ({"candidates": ["0"]}, "validation_error"),
            ({"candidates": [0], "x": 1}, "validation_error"),
        ):
            assert assert_error_shape(api.post(f"/v1/designs/{design_id}/pick", json=body), 422)["code"] == code
        not_image = upload(api, design_id, b"GIF89a not really", LICENSED, name="x.jpg")
        assert assert_error_shape(not_image, 422)["code"] == "invalid_image"
        synthetic = upload(api, design_id, encode(samples.astronaut(), "JPEG"), {"kind": "synthetic", "who": "me"})
        assert assert_error_shape(synthetic, 422)["code"] == "synthetic_not_allowed"
        no_evidence = upload(api, design_id, encode(samples.astronaut(), "JPEG"), {"kind": "licensed", "who": "me"})
        assert assert_error_shape(no_evidence, 422)["code"] == "invalid_provenance"
        assert (
            assert_error_shape(api.post(f"/v1/designs/{design_id}/turnaround", json={}), 409)["code"]
            == "design_not_ready"
        )
        assert assert_error_shape(api.post(f"/v1/designs/{design_id}/register", json={"provenance": LICENSED}), 409)
        unchanged = api.get(f"/v1/designs/{design_id}").json()
        assert unchanged["pick"] is None and unchanged["uploads"] == [] and unchanged["stage"] == "describe"

        assert api.post(f"/v1/designs/{design_id}/pick", json={"candidates": [0]}).json()["stage"] == "pick"
        bad_grid = api.post(f"/v1/designs/{design_id}/turnaround", json={"grid": {"slots": [["front", "smile", "x"]]}})
        assert assert_error_shape(bad_grid, 422)["code"] == "invalid_grid"
        # a tiny model's candidate is noise: the identity method finds no face in it; the job fails saying so and
        # the design stays usable
        one_slot = {"grid": {"slots": [["front", "neutral", "studio"]]}}
        assert api.post(f"/v1/designs/{design_id}/turnaround", json=one_slot).status_code == 202
        with api.stream("GET", f"/v1/designs/{design_id}/events") as response:
            assert list(parse_sse(response.iter_lines()))[-1].type == "failed"
        failed = ready(api, design_id)
        assert failed["status"] == "failed" and "the pick has no face" in failed["error"]
        assert api.post(f"/v1/designs/{design_id}/pick", json={"candidates": [0]}).json()["status"] == "ready"

        for body in ({"candidates": 17}, {"candidates": 100000}, {"candidates": "3"}, {"candidates": 0}):
            assert_error_shape(api.post("/v1/designs", json={"character_id": "x-design", "name": "X", **body}), 422)
        assert_error_shape(api.post("/v1/designs", json={"character_id": "../etc", "name": "X"}), 422)
        assert_error_shape(api.post("/v1/designs", json={"character_id": "x", "name": "X", "preset": "nope"}), 404)
        for hostile in ("../../etc/passwd", "0" * 31, "Z" * 32):
            assert api.get(f"/v1/designs/{hostile}").status_code == 404

        # expiry: an expired design answers 404 and is deleted with its images and jobs
        with DesignStore.open() as store:
            store.set_expiry(design_id, utcnow() - timedelta(seconds=1))
        assert assert_error_shape(api.get(f"/v1/designs/{design_id}"), 404)["code"] == "not_found"
        assert not (get_settings().home / "designs" / design_id).exists()
        with client(service, keys.admin) as admin:
            assert admin.get(f"/v1/jobs/{started['job_id']}").status_code == 404
        assert api.get("/healthz").status_code == 200


def test_a_design_draft_key_is_nobody_elses_character(service, keys, design_keys):
    """A design's draft key (``draft-<hex>``: the id its jobs render its pick's identity under, named in its images'
    metadata) is reserved: another tenant cannot register a character under it, and no key, admin included, can
    render it or delete what its design's jobs left through the public routes (a security review registered it, then
    rendered the other tenant's pick identity and purged that tenant's design jobs)."""
    with client(service, design_keys["writer"]) as owner, client(service, design_keys["other"]) as other:
        started = new_design(owner)
        design_id = started["design_id"]
        follow(owner, design_id)
        with DesignStore.open() as store:
            draft_key = store.get(design_id).draft_key
        assert draft_key.startswith("draft-")

        stolen = other.post(
            "/v1/characters",
            data={"id": draft_key, "name": "Thief", "provenance": json.dumps(LICENSED)},
            files=[("references", (name, data, "image/png")) for name, data in hopper_set(2)],
        )
        error = assert_error_shape(stolen, 422)
        assert error["code"] == "invalid_character_id" and "reserved for design drafts" in error["message"]
        assert draft_key not in {c["id"] for c in other.get("/v1/characters").json()["characters"]}

        with client(service, keys.admin) as admin:
            rendered = admin.post("/v1/renders", json={"prompt": "p", "preset": "tiny-flux", "character": draft_key})
            assert assert_error_shape(rendered, 404)["code"] == "unknown_character"
            submitted = admin.post("/v1/jobs", json={"prompt": "p", "preset": "tiny-flux", "character": draft_key})
            assert assert_error_shape(submitted, 404)["code"] == "unknown_character"
            assert assert_error_shape(admin.delete(f"/v1/characters/{draft_key}"), 404)["code"] == "unknown_character"
            # the design's own job is still there for its owner
            assert admin.get(f"/v1/jobs/{started['job_id']}").status_code != 404
        assert ready(owner, design_id)["status"] == "ready"
        assert owner.delete(f"/v1/designs/{design_id}").json()["deleted"]["jobs"] == 1


def test_design_jobs_are_listed_with_render_jobs(service, keys):
    """A design's step is a job of its key like a render job: `GET /v1/jobs` (owner and admin) and
    `GET /v1/jobs/{id}` answer 200 with each job's kind and result shape; another tenant still gets 404."""
    with ServeStore.open() as store:
        owner_key = create_key(store, "design-jobs", ["characters:write", "render"], tenant="studio-jobs")[1]
    with (
        client(service, owner_key) as owner,
        client(service, keys.admin) as admin,
        client(service, keys.other_render) as other,
    ):
        started = new_design(owner)
        design_id, design_job = started["design_id"], started["job_id"]
        follow(owner, design_id)
        assert ready(owner, design_id)["status"] == "ready"
        submitted = owner.post("/v1/jobs", json={"preset": "tiny-flux", "prompt": "a lighthouse", "seed": 5})
        assert submitted.status_code == 202, submitted.text
        render_job = submitted.json()["job_id"]
        assert submitted.json()["kind"] == "render"
        deadline = time.monotonic() + 120
        while owner.get(f"/v1/jobs/{render_job}").json()["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, "render job still running"
            time.sleep(0.2)

        for api in (owner, admin):
            listed = api.get("/v1/jobs", params={"limit": 500})
            assert listed.status_code == 200, listed.text
            jobs = {job["job_id"]: job for job in listed.json()["jobs"]}
            assert jobs[design_job]["kind"] == "design" and jobs[render_job]["kind"] == "render"
            assert jobs[design_job]["status"] == "done"
            assert jobs[design_job]["result"]["design_id"] == design_id
            assert jobs[design_job]["result"]["op"] == "describe" and jobs[design_job]["result"]["rendered"] == 1
            assert jobs[design_job]["links"]["design"] == f"/v1/designs/{design_id}"
            assert jobs[render_job]["status"] == "done" and jobs[render_job]["result"]["preset"] == "tiny-flux"
            one = api.get(f"/v1/jobs/{design_job}", params={"include_images": "true"})
            assert one.status_code == 200, one.text
            assert one.json()["kind"] == "design" and one.json()["result"]["images"] == []
        owned = {job["job_id"] for job in owner.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
        assert owned == {design_job, render_job}  # a key still sees only its own jobs
        # ownership is unchanged: another tenant's key neither lists nor reads them
        assert design_job not in {j["job_id"] for j in other.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
        assert assert_error_shape(other.get(f"/v1/jobs/{design_job}"), 404)["code"] == "unknown_job"
        # a design job's images are its design's
        assert assert_error_shape(owner.get(f"/v1/jobs/{design_job}/images/0"), 404)["code"] == "not_found"
