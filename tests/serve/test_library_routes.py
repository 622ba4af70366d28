"""The library routes against the running service: a character's references, contact sheet, report and recent
renders, and evaluation runs through the API — each only for its own tenant, each gone with its character.

Tiny presets render noise, so renders have no face: their gate scores are null (not scored as a face) and the
evaluation suite is ungated, as the smoke suite is. The report of the stored references is checked against the
one registration answered (same numbers from the stored analyses, no face model).
"""

from __future__ import annotations

import io
import json
import re
import time

import httpx
import pytest
from PIL import Image

from imagegen.client import Client
from imagegen.serve.auth import create_key
from imagegen.serve.store import ServeStore
from imagegen.settings import get_settings
from tests.photos import astronaut_set
from tests.serve.conftest import assert_error_shape

SYNTHETIC = {"kind": "synthetic", "creator": "library-tests"}
CHARACTER = "lib-ava"


@pytest.fixture(scope="module")
def lib(service):
    """Keys of two tenants: A (writer+approver, renderer), B (renderer); plaintext keys by name."""
    with ServeStore.open() as store:
        return {
            "a_write": create_key(store, "lib-a-write", ["characters:write", "characters:approve"], tenant="lib-a")[1],
            "a_render": create_key(store, "lib-a-render", ["render"], tenant="lib-a")[1],
            "b_render": create_key(store, "lib-b-render", ["render"], tenant="lib-b")[1],
        }


def _get(http: httpx.Client, key: str, path: str, **kwargs) -> httpx.Response:
    return http.get(path, headers={"Authorization": f"Bearer {key}"}, **kwargs)


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_character_library_references_report_and_recent_renders(service, lib, keys, http):
    with Client(service.url, lib["a_write"]) as writer, Client(service.url, lib["a_render"]) as renderer:
        created = writer.create_character(CHARACTER, "Ava", list(astronaut_set(3)), SYNTHETIC)
        writer.approve_character(CHARACTER)
        base = f"/v1/characters/{CHARACTER}"

        # references: one entry per stored image, its face analysis, and the bytes themselves
        refs = _get(http, lib["a_render"], f"{base}/references").json()["references"]
        assert [r["index"] for r in refs] == [0, 1, 2]
        assert all(
            r["face"]["found"] and r["face"]["usable"] and r["url"] == f"{base}/references/{r['index']}" for r in refs
        )
        first = _get(http, lib["a_render"], refs[0]["url"])
        assert first.headers["cache-control"] == "private, no-store"
        assert _png(first.content).size == (refs[0]["width"], refs[0]["height"])

        # the report rebuilt from the stored analyses is the one registration answered
        report = _get(http, lib["a_render"], f"{base}/report").json()
        registered = created["report"]
        assert (report["verdict"], report["consistency"], report["backend"]) == (
            registered["verdict"],
            registered["consistency"],
            registered["backend"],
        )
        assert [i["similarity"] for i in report["images"]] == [i["similarity"] for i in registered["images"]]
        assert report["version"] == 2 and report["status"] == "approved"
        sheet = _png(_get(http, lib["a_render"], f"{base}/contact-sheet").content)
        assert sheet.width == 3 * 224  # one column per reference, up to five

        # a gated sync render and an ungated job, by two keys of the tenant
        prompt = "ava reading in a library <b>at night</b>"
        sync = renderer.render(
            prompt=prompt,
            character=CHARACTER,
            seed=11,
            steps=2,
            min_identity_similarity=0.2,
            max_attempts=1,
            identity_weight=0.8,
        )
        job = renderer.submit_job(prompt="ava in the rain", character=CHARACTER, seed=21, steps=2, num_images=2)
        renderer.wait_job(job["job_id"])
        rows = _get(http, lib["a_write"], f"{base}/renders", params={"limit": 10}).json()["renders"]
        assert len(rows) == 3
        by_id = {r["image_id"]: r for r in rows}
        mine = by_id[sync.images[0].info["image_id"]]
        assert (mine["prompt"], mine["seed"], mine["identity_weight"], mine["threshold"]) == (prompt, 11, 0.8, 0.2)
        # noise has no face: the gate scored it null and it did not pass
        assert (mine["similarity"], mine["passed"], mine["scored"]) == (
            sync.images[0].info["identity_similarity"],
            False,
            False,
        )
        assert mine["image_url"] is None and mine["job_id"] is None  # a sync render's PNG is only in its response
        assert _get(http, lib["a_write"], f"{base}/renders/{mine['image_id']}").status_code == 404
        from_job = [r for r in rows if r["job_id"] == job["job_id"]]
        assert sorted(r["seed"] for r in from_job) == [21, 22]
        assert all(r["threshold"] is None and r["passed"] is None and r["method"] for r in from_job)
        for row in from_job:  # any key of the tenant fetches a job's image while the job keeps it
            png = _get(http, lib["a_write"], row["image_url"])
            assert png.status_code == 200 and png.headers["x-image-id"] == row["image_id"]
            assert png.content == renderer.job_image(job["job_id"], row["image_index"])
        assert rows[0]["created_at"] >= rows[-1]["created_at"]
        assert [r["image_id"] for r in _get(http, keys.admin, f"{base}/renders").json()["renders"]] == [
            r["image_id"] for r in rows
        ]

        # another tenant: every route answers like a character that does not exist
        for path in (
            "references",
            "references/0",
            "contact-sheet",
            "report",
            "renders",
            f"renders/{rows[0]['image_id']}",
        ):
            foreign = assert_error_shape(_get(http, lib["b_render"], f"{base}/{path}"), 404)
            nobody = assert_error_shape(_get(http, lib["b_render"], f"/v1/characters/lib-nobody/{path}"), 404)
            assert foreign["code"] == nobody["code"] == "unknown_character"
            assert foreign["message"].replace(CHARACTER, "X") == nobody["message"].replace("lib-nobody", "X")
        # hostile paths
        assert assert_error_shape(_get(http, lib["a_render"], f"{base}/references/3"), 404)["code"] == "not_found"
        assert assert_error_shape(_get(http, lib["a_render"], f"{base}/references/-1"), 404)["code"] == "not_found"
        assert_error_shape(_get(http, lib["a_render"], f"{base}/references/x"), 422)
        assert_error_shape(_get(http, lib["a_render"], f"{base}/renders/..%2F..%2Fserve.db"), 404)
        assert_error_shape(_get(http, lib["a_render"], f"{base}/renders", params={"limit": 0}), 422)
        assert_error_shape(_get(http, lib["a_render"], "/v1/characters/NOT..A..SLUG/report"), (404, 422))

        # deleting the character deletes its recent renders (prompts included) and their images
        urls = [r["image_url"] for r in from_job]
        purged = writer.delete_character(CHARACTER)["renders"]
        assert purged["recent_renders"] == 3 and purged["jobs"] == 1
        with ServeStore.open() as store:
            assert store.recent_renders(CHARACTER, None) == []
        for url in urls:
            assert _get(http, lib["a_write"], url).status_code == 404


SUITE = {
    "name": "lib-api-smoke",
    "gated": False,
    "presets": ["tiny-flux"],
    "methods": [{"name": "none"}, {"name": "default", "weights": [1.0]}],
    "on_unsupported": "skip",
    "characters": [{"id": "lib-eval"}],
    "prompts": [{"id": "studio", "text": "studio portrait of {name}", "tags": {"pose": "portrait"}}],
    "seeds": [3],
    "size": {"width": 64, "height": 64},
    "steps": 2,
    "bootstrap": {"samples": 50, "seed": 0},
}


def _wait_run(http: httpx.Client, key: str, run_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = _get(http, key, f"/v1/eval/runs/{run_id}").json()
        if run["status"] in ("done", "failed"):
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} still {run['status']} after {timeout_s}s: {run['progress']}")


def test_eval_runs_through_the_api(service, lib, keys, http):
    auth = {"Authorization": f"Bearer {lib['a_render']}"}
    with Client(service.url, lib["a_write"]) as writer:
        writer.create_character("lib-eval", "Evie", list(astronaut_set(3)), SYNTHETIC)
        writer.approve_character("lib-eval")

        submitted = http.post("/v1/eval/runs", json=SUITE, headers=auth)
        assert submitted.status_code == 202, submitted.text
        run_id = submitted.json()["run_id"]
        assert submitted.headers["location"] == f"/v1/eval/runs/{run_id}"
        run = _wait_run(http, lib["a_render"], run_id)
        assert run["status"] == "done", run["error"]
        summary = run["summary"]
        assert run["verdict"] == summary["verdict"] == "ungated"
        # the grid: two methods x one character, prompt and seed
        assert summary["rendered"] + summary["unusable"] + summary["skipped"] == 2 and summary["rendered"] >= 1
        metrics = _get(http, lib["a_write"], f"/v1/eval/runs/{run_id}/metrics.json").json()
        assert metrics["verdict"] == run["verdict"]
        assert len(metrics["images"]) == summary["rendered"] + summary["unusable"]

        report = _get(http, lib["a_write"], f"/v1/eval/runs/{run_id}/report.html")
        assert report.headers["content-type"].startswith("text/html")
        csp = report.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "img-src data:" in csp and "sandbox" in csp
        html = report.text
        assert "<script" not in html.lower() and str(get_settings().home) not in html and "imagegen-eval-" not in html
        sources = re.findall(r'<img[^>]*src="([^"]*)"', html)
        assert sources and all(s.startswith("data:image/") for s in sources)
        assert (
            "junit.xml" in run["links"] and "<testsuite" in _get(http, lib["a_write"], run["links"]["junit.xml"]).text
        )

        # tenancy: another tenant sees nothing, admin sees it
        assert run_id in {r["run_id"] for r in _get(http, lib["a_write"], "/v1/eval/runs").json()["runs"]}
        assert run_id not in {r["run_id"] for r in _get(http, lib["b_render"], "/v1/eval/runs").json()["runs"]}
        assert run_id in {r["run_id"] for r in _get(http, keys.admin, "/v1/eval/runs").json()["runs"]}
        for path in ("", "/report.html"):
            foreign = assert_error_shape(_get(http, lib["b_render"], f"/v1/eval/runs/{run_id}{path}"), 404)
            assert foreign["code"] == "not_found"

        # what a tenant's suite may not do; each is refused before anything runs
        b_auth = {"Authorization": f"Bearer {lib['b_render']}"}
        refused = [
            (http.post("/v1/eval/runs", json=SUITE, headers=b_auth), 404, "unknown_character", "character_id"),
            (http.post("/v1/eval/runs", json={**SUITE, "workers": 4}, headers=auth), 422, "invalid_suite", "workers"),
            (
                http.post("/v1/eval/runs", json={**SUITE, "baseline": "/etc"}, headers=auth),
                422,
                "invalid_suite",
                "baseline",
            ),
            (
                http.post(
                    "/v1/eval/runs", json={**SUITE, "characters": [{"id": "x", "sample": "astronaut"}]}, headers=auth
                ),
                422,
                "invalid_suite",
                "characters",
            ),
            (
                http.post("/v1/eval/runs", json={**SUITE, "presets": ["flux-dev"]}, headers=auth),
                404,
                "unknown_preset",
                "presets",
            ),
            (
                http.post("/v1/eval/runs", json={**SUITE, "seeds": list(range(200))}, headers=auth),
                422,
                "invalid_suite",
                "suite",
            ),
            (
                http.post("/v1/eval/runs", json={**SUITE, "size": {"width": 4096, "height": 64}}, headers=auth),
                422,
                "invalid_suite",
                "width",
            ),
            (http.post("/v1/eval/runs", json=[1, 2], headers=auth), 422, "invalid_suite", "suite"),
            (
                http.post(
                    "/v1/eval/runs", content=b"a: &x [1]\nb: *x\n", headers={**auth, "content-type": "application/yaml"}
                ),
                422,
                "invalid_suite",
                "suite",
            ),
            (
                http.post("/v1/eval/runs", content=b"name: x", headers={**auth, "content-type": "text/plain"}),
                415,
                None,
                "suite",
            ),
            (
                http.post("/v1/eval/runs", json=SUITE, headers={"Authorization": f"Bearer {lib['a_write']}"}),
                403,
                "forbidden",
                None,
            ),
        ]
        for response, status, code, field in refused:
            error = assert_error_shape(response, status)
            assert code is None or error["code"] == code, error
            assert field is None or error["field"] == field or field in error["message"], error
        assert_error_shape(_get(http, lib["a_render"], "/v1/eval/runs/..%2F..%2Fregistry.db"), 404)
        assert_error_shape(_get(http, lib["a_render"], f"/v1/eval/runs/{run_id}/run.json"), 404)

        # a YAML suite naming the first run as its baseline: compared with it, by run id (never a path)
        lines = [f"{k}: {json.dumps(v)}" for k, v in {**SUITE, "name": "lib-yaml", "baseline": run_id}.items()]
        second = http.post(
            "/v1/eval/runs", content="\n".join(lines).encode(), headers={**auth, "content-type": "application/yaml"}
        )
        assert second.status_code == 202, second.text
        compared = _wait_run(http, lib["a_render"], second.json()["run_id"])
        assert compared["status"] == "done", compared["error"]
        assert compared["summary"]["comparison"]["baseline"] == f"run {run_id}"
        assert f"Comparison with run {run_id}" in _get(http, lib["a_render"], compared["links"]["report.html"]).text

        # two runs at once per tenant; deleting a run stops it and removes it
        started = [http.post("/v1/eval/runs", json=SUITE, headers=auth) for _ in range(2)]
        assert [r.status_code for r in started] == [202, 202], [r.text for r in started]
        busy = http.post("/v1/eval/runs", json=SUITE, headers=auth)
        assert assert_error_shape(busy, 429)["code"] == "too_many_eval_runs" and busy.headers["retry-after"]
        for response in started:
            run_url = f"/v1/eval/runs/{response.json()['run_id']}"
            assert http.delete(run_url, headers=auth).status_code == 204
            assert_error_shape(_get(http, lib["a_render"], run_url), 404)

        # deleting a character deletes the runs that rendered it, and their files
        assert writer.delete_character("lib-eval")["renders"]["eval_runs"] == 2
        for gone in (run_id, compared["run_id"]):
            assert_error_shape(_get(http, lib["a_render"], f"/v1/eval/runs/{gone}"), 404)
            with ServeStore.open() as store:
                assert store.get_eval_run(gone) is None
