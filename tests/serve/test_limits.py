"""One key cannot starve the others: per-key rate, renders, jobs and event streams; caps that fit the ingress.

The first tests are the limit arithmetic on its own (a token bucket on a test clock, the JSON
depth scanner, the capacity rule); the rest run against the session service. Keys with low limits
get them from ``key_overrides`` in ``TEST_INGRESS`` (by key name), so the rest of the suite keeps
the defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from datetime import UTC, datetime

import httpx
import pytest

from imagegen.errors import ConfigError
from imagegen.serve.auth import create_key
from imagegen.serve.config import IngressConfig
from imagegen.serve.errors import ApiError
from imagegen.serve.http.jsonlimits import DepthScanner, JsonTooDeep, parse_json_limited
from imagegen.serve.launcher import check_ingress, prepare_config
from imagegen.serve.limits import KeyLimiter
from imagegen.serve.store import ApiKey, ServeStore
from tests.serve.conftest import assert_error_shape, cancelled_total, deploy_user_config, in_threads

#: a job that keeps a renderer busy for a while (so its event streams stay open)
LONG_JOB = {"preset": "tiny-sdxl", "prompt": "a long job", "seed": 5, "steps": 50, "width": 256, "height": 256}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _key(name: str = "someone", key_id: str = "k1") -> ApiKey:
    return ApiKey(key_id, name, ["render"], datetime.now(UTC), None, None)


# -- the arithmetic -----------------------------------------------------------------------------------
def test_token_bucket_allows_the_burst_then_the_rate_and_says_when():
    clock = Clock()
    cfg = IngressConfig(key_rate_per_s=2.0, key_burst=3)
    limiter = KeyLimiter(lambda: cfg, clock)
    key = _key()
    for _ in range(3):
        limiter.admit(key)
    with pytest.raises(ApiError) as refused:
        limiter.admit(key)
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert refused.value.headers["Retry-After"] == "1"  # 0.5 s to the next token, rounded up
    clock.now += 0.5
    limiter.admit(key)  # the token that came back
    with pytest.raises(ApiError):
        limiter.admit(key)
    limiter.admit(_key("other", "k2"))  # another key has its own bucket


def test_retry_after_is_computed_from_the_rate():
    clock = Clock()
    cfg = IngressConfig(key_overrides={"slow": {"key_rate_per_s": 0.1, "key_burst": 1}})
    limiter = KeyLimiter(lambda: cfg, clock)
    slow = _key("slow")
    limiter.admit(slow)
    clock.now += 3.0  # 0.3 of a token back: 7 s to go
    with pytest.raises(ApiError) as refused:
        limiter.admit(slow)
    assert refused.value.headers["Retry-After"] == "7"


def test_stream_caps_per_key_and_in_total_and_leases_give_back():
    cfg = IngressConfig(max_streams_per_key=2, max_streams=3)
    refusals: list[str] = []
    limiter = KeyLimiter(lambda: cfg, on_refused=refusals.append)
    a, b = _key("a", "ka"), _key("b", "kb")
    leases = [limiter.open_stream(a), limiter.open_stream(a)]
    with pytest.raises(ApiError) as per_key:
        limiter.open_stream(a)
    assert per_key.value.code == "too_many_streams" and "this key" in per_key.value.message
    leases.append(limiter.open_stream(b))
    with pytest.raises(ApiError) as total:
        limiter.open_stream(b)
    assert total.value.code == "too_many_streams" and "3 event streams are open" in total.value.message
    leases[0].release()
    leases[0].release()  # idempotent: one release per lease
    assert limiter.streams == {"ka": 1, "kb": 1}
    leases.append(limiter.open_stream(b))
    for lease in leases:
        lease.release()
    assert limiter.streams == {} and limiter.streams_open == 0
    assert refusals == ["too_many_streams", "too_many_streams"]  # what the ingress counts in its metrics


def test_render_slots_per_key():
    cfg = IngressConfig(max_renders_per_key=1)
    limiter = KeyLimiter(lambda: cfg)
    key = _key()
    with limiter.render_slot(key):
        with pytest.raises(ApiError) as refused, limiter.render_slot(key):
            pass
        assert refused.value.code == "too_many_renders"
        with limiter.render_slot(_key("other", "k2")):
            pass
    assert limiter.renders == {}


def test_images_in_flight_per_key_count_images_not_requests():
    """A render is num_images renderer calls: a key's share of the renderers is counted in images."""
    cfg = IngressConfig(max_images_in_flight_per_key=8, key_overrides={"big": {"max_images_in_flight_per_key": 12}})
    refusals: list[str] = []
    limiter = KeyLimiter(lambda: cfg, on_refused=refusals.append)
    key = _key()
    with limiter.image_slots(key, 6):
        with pytest.raises(ApiError) as refused, limiter.image_slots(key, 3):
            pass
        error = refused.value
        assert (error.status, error.code, error.headers) == (429, "too_many_images", {"Retry-After": "2"})
        assert "this key has 6 images" in error.message and "(limit 8)" in error.message, error.message
        assert limiter.images == {"k1": 6}  # the refused request holds nothing
        with limiter.image_slots(key, 2):  # what still fits
            pass
        with limiter.image_slots(_key("other", "k2"), 8):  # another key has a share of its own
            pass
        with limiter.image_slots(_key("big", "k3"), 12):  # key_overrides
            pass
    assert limiter.images == {}
    with pytest.raises(ApiError) as too_many, limiter.image_slots(key, 9):
        pass
    error = too_many.value
    assert (error.status, error.code, error.field) == (422, "invalid_request", "num_images")
    assert "at most 8" in error.message, error.message
    assert limiter.images == {} and refusals == ["too_many_images"]
    # the shipped default: two full requests, half of a renderer's queue (configs/serve.yaml: 32)
    assert IngressConfig().max_images_in_flight_per_key == 16
    assert check_ingress(prepare_config(None)).max_images_in_flight_per_key == 16


def test_a_job_waits_for_its_keys_images_and_shares_them_with_sync_renders():
    cfg = IngressConfig(max_images_in_flight_per_key=8)
    limiter = KeyLimiter(lambda: cfg)
    key = _key()

    async def scenario() -> None:
        release = asyncio.Event()

        async def job(count: int) -> None:
            async with limiter.images_when_free(key, count):
                await release.wait()

        first = asyncio.create_task(job(6))
        await asyncio.sleep(0.01)
        assert limiter.images == {"k1": 6}
        with pytest.raises(ApiError) as refused, limiter.image_slots(key, 3):  # a sync render of the key: 429
            pass
        assert refused.value.code == "too_many_images"
        second = asyncio.create_task(job(4))  # a job of the key: waits for room
        cancelled = asyncio.create_task(job(4))
        larger = asyncio.create_task(job(20))  # above the limit (stored before it was lowered): the whole limit
        await asyncio.sleep(0.05)
        assert not (second.done() or cancelled.done() or larger.done()) and limiter.images == {"k1": 6}
        cancelled.cancel()  # a job deleted while it waits holds nothing
        await asyncio.gather(cancelled, return_exceptions=True)
        assert limiter.images == {"k1": 6}
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second, larger), 5)
        assert limiter.images == {}

    asyncio.run(scenario())


def test_depth_scanner_counts_outside_strings_in_any_chunking():
    text = b'{"a": "[[[[\\"[[[[", "b": [[1, {"c": "\\\\"}]]}'  # depth 4 at most; brackets in strings ignored
    for size in (1, 2, 3, 7, len(text)):
        scanner = DepthScanner(4)
        for i in range(0, len(text), size):
            scanner.feed(text[i : i + size])
        assert scanner.depth == 0
    with pytest.raises(JsonTooDeep):
        DepthScanner(3).feed(text)


def test_parse_json_limited():
    assert parse_json_limited('{"kind": "original"}', max_depth=32, field="provenance") == {"kind": "original"}
    with pytest.raises(ApiError) as deep:
        parse_json_limited("[" * 5000 + "]" * 5000, max_depth=32, field="card")
    assert (deep.value.status, deep.value.code, deep.value.field) == (422, "json_too_deep", "card")
    with pytest.raises(ApiError) as digits:
        parse_json_limited('{"n": ' + "1" * 5000 + "}", max_depth=32, field="card")
    assert digits.value.code == "invalid_json"


def test_streams_and_renders_must_fit_the_ingress():
    assert check_ingress(prepare_config(None)).max_streams == 48  # the shipped config fits exactly
    with pytest.raises(ConfigError, match=r"max_streams \(90\) \+ max_inflight_renders \(32\) \+ reserved_requests"):
        check_ingress(prepare_config(None, ingress={"max_streams": 90}))
    with pytest.raises(ConfigError, match="max_ongoing_requests \\(50\\)"):
        check_ingress(prepare_config(None, ingress_options={"max_ongoing_requests": 50}))
    with pytest.raises(ConfigError, match="max_streams_per_key"):
        check_ingress(prepare_config(None, ingress={"max_streams_per_key": 60}))


# -- against the service --------------------------------------------------------------------------------
def _new_key(name: str, tenant: str = "default") -> str:
    with ServeStore.open() as store:
        return create_key(store, name, ["render"], tenant=tenant)[1]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _cancel(http: httpx.Client, key: str, job_id: str) -> None:
    with contextlib.suppress(httpx.HTTPError):
        http.delete(f"/v1/jobs/{job_id}", headers=_bearer(key))


def test_150_streams_of_one_key_starve_nobody(service, keys, http):
    """One key opens 150 event streams: it gets its cap, 429 past it; /healthz and another tenant's render go on."""
    key = _new_key("limits-streams", tenant="streams-tenant")  # keys.other_render is of the default tenant
    job = http.post("/v1/jobs", json={**LONG_JOB, "num_images": 8}, headers=_bearer(key)).json()
    url = f"{service.url}/v1/jobs/{job['job_id']}/events"
    seen: dict[str, object] = {}

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as client:
            async with contextlib.AsyncExitStack() as streams:

                async def open_one() -> httpx.Response:
                    response = await streams.enter_async_context(client.stream("GET", url, headers=_bearer(key)))
                    if response.status_code != 200:
                        await response.aread()
                    return response

                seen["responses"] = await asyncio.gather(*(open_one() for _ in range(150)))
                # meanwhile: /healthz answers within a second, another key renders
                async with httpx.AsyncClient(base_url=service.url, timeout=1.0) as quick:
                    seen["health"] = (await quick.get("/healthz")).status_code
                async with httpx.AsyncClient(base_url=service.url, timeout=300) as other:
                    body = {"prompt": "not starved", "seed": 2}
                    seen["render"] = await other.post("/v1/renders", json=body, headers=_bearer(keys.other_render))
                seen["job"] = (await client.get(f"{service.url}/v1/jobs/{job['job_id']}", headers=_bearer(key))).json()
            # every stream is closed now: their slots come back (once the server has seen the disconnects)
            for _ in range(50):
                async with client.stream("GET", url, headers={**_bearer(key), "Last-Event-ID": "999999"}) as again:
                    seen["reopened"] = again.status_code
                if again.status_code == 200:
                    break
                await asyncio.sleep(0.2)

    try:
        asyncio.run(scenario())
    finally:
        _cancel(http, key, job["job_id"])
    assert seen["job"]["status"] in ("queued", "running"), "the job ended before the streams were counted"
    statuses = [r.status_code for r in seen["responses"]]
    assert statuses.count(200) == IngressConfig().max_streams_per_key, statuses
    assert statuses.count(429) == 150 - IngressConfig().max_streams_per_key, statuses
    codes = set()
    for response in seen["responses"]:
        if response.status_code == 429:
            codes.add(assert_error_shape(response)["code"])
            assert int(response.headers["retry-after"]) >= 1
    # past its stream cap; 150 at once is also past the key's burst (key_burst, 100): both say 429
    assert "too_many_streams" in codes and codes <= {"too_many_streams", "rate_limited"}, codes
    assert seen["health"] == 200
    assert seen["render"].status_code == 200, seen["render"].text[:300]
    assert seen["reopened"] == 200
    metrics = http.get("/metrics", headers=_bearer(keys.admin)).text
    assert 'imagegen_rejected_total{reason="too_many_streams"}' in metrics


def test_the_client_follows_reconnects_without_losing_or_repeating_events(service):
    from imagegen.client import Client

    key = _new_key("limits-lifetime")  # TEST_INGRESS: streams end after 1 s
    with Client(service.url, key) as client:
        job = client.submit_job(preset="tiny-sdxl", prompt="followed", seed=9, steps=30, width=128, height=128)
        events = list(client.events(job["job_id"]))
    ids = [e.id for e in events if e.id is not None]
    assert ids == sorted(set(ids)), ids  # no event twice, none out of order
    assert events[-1].type == "done", [e.type for e in events]
    assert "reconnect" not in {e.type for e in events}  # the client handles those itself
    steps = [e.data["step"] for e in events if e.type == "progress"]
    assert steps and steps == sorted(steps), steps


def test_rate_limit_429_with_a_computed_retry_after(service, http):
    key = _new_key("limits-rate")  # TEST_INGRESS: 3 at once, then one every 100 s
    statuses = [http.get("/v1/jobs?limit=1", headers=_bearer(key)).status_code for _ in range(3)]
    assert statuses == [200, 200, 200], statuses
    refused = http.get("/v1/jobs?limit=1", headers=_bearer(key))
    assert assert_error_shape(refused, 429)["code"] == "rate_limited"
    assert 2 <= int(refused.headers["retry-after"]) <= 100  # from the bucket, not the constant retry_after_s
    # other keys are not affected
    assert http.get("/healthz").status_code == 200


def test_jobs_per_key(service, http):
    key = _new_key("limits-jobs")  # TEST_INGRESS: 2 queued or running
    accepted = []
    try:
        for i in range(2):
            response = http.post("/v1/jobs", json={**LONG_JOB, "seed": i, "num_images": 4}, headers=_bearer(key))
            assert response.status_code == 202, response.text[:300]
            accepted.append(response.json()["job_id"])
        refused = http.post("/v1/jobs", json={**LONG_JOB, "seed": 9}, headers=_bearer(key))
        states = [http.get(f"/v1/jobs/{j}", headers=_bearer(key)).json()["status"] for j in accepted]
    finally:
        for job_id in accepted:
            _cancel(http, key, job_id)
    assert set(states) <= {"queued", "running"}, "a job ended before the third was submitted"
    error = assert_error_shape(refused, 429)
    assert error["code"] == "too_many_jobs" and int(refused.headers["retry-after"]) >= 1


def test_jobs_per_key_under_concurrent_submissions(service, http):
    """12 POST /v1/jobs of one key at the same instant: exactly its cap (2) get in, the rest 429 ``too_many_jobs``."""
    key = _new_key("limits-jobs")  # TEST_INGRESS: 2 queued or running
    barrier = threading.Barrier(12)
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        with httpx.Client(base_url=service.url, timeout=120) as client:
            barrier.wait()
            response = client.post("/v1/jobs", json={**LONG_JOB, "seed": 100 + i}, headers=_bearer(key))
        with lock:
            responses.append(response)

    in_threads(submit, 12)
    accepted = [r.json()["job_id"] for r in responses if r.status_code == 202]
    try:
        listed = http.get("/v1/jobs?limit=50", headers=_bearer(key)).json()["jobs"]
    finally:
        for job_id in accepted:
            _cancel(http, key, job_id)
    assert len(accepted) == 2, [r.status_code for r in responses]
    assert len(listed) == 2 and {j["job_id"] for j in listed} == set(accepted)  # the refused left no job behind
    for refused in (r for r in responses if r.status_code != 202):
        error = assert_error_shape(refused, 429)
        assert error["code"] == "too_many_jobs" and int(refused.headers["retry-after"]) >= 1
        assert error["message"].endswith("jobs queued or running (limit 2); retry when one ends")


def test_renders_per_key(service, http):
    key = _new_key("limits-renders")  # TEST_INGRESS: 1 synchronous render at a time
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        body = {"prompt": f"one at a time {i}", "seed": i, "steps": 30, "width": 128, "height": 128}
        with httpx.Client(base_url=service.url, timeout=300) as client:
            response = client.post("/v1/renders", json=body, headers=_bearer(key))
        with lock:
            responses.append(response)

    in_threads(one, 4)
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and set(statuses) <= {200, 429}, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert refused, statuses
    for response in refused:
        assert assert_error_shape(response)["code"] == "too_many_renders"


def _inflight_renders(admin) -> float:
    match = re.search(r"^imagegen_inflight_renders (\S+)$", admin.metrics(), re.M)
    return float(match.group(1)) if match else 0.0


def test_a_key_past_its_images_in_flight_gets_429_while_another_key_renders(service, http, admin):
    """The issue's repro in small: one key's images fill its share of the renderers; its next render is refused up
    front (429 ``too_many_images``), another tenant's render goes through, and a num_images above the share is 422."""
    key = _new_key("limits-images")  # TEST_INGRESS: 4 images in the renderers at once
    other_key = _new_key("limits-images-neighbour", tenant="images-tenant")
    big: dict[str, httpx.Response] = {}

    def render_big() -> None:
        body = {"preset": "tiny-flux", "prompt": "four at once", "seed": 1, "num_images": 4, "steps": 30}
        body.update(width=128, height=128)
        with httpx.Client(base_url=service.url, timeout=300) as client:
            big["response"] = client.post("/v1/renders", json=body, headers=_bearer(key))

    for path in ("/v1/renders", "/v1/jobs"):  # more than the share in one request: never fits, 422 naming the most
        too_many = http.post(path, json={"prompt": "five", "num_images": 5}, headers=_bearer(key))
        error = assert_error_shape(too_many, 422)
        assert error["field"] == "num_images" and "at most 4" in error["message"], error
    thread = threading.Thread(target=render_big)
    thread.start()
    try:
        for _ in range(600):  # until the 4-image render is admitted (it holds the key's 4 images)
            if _inflight_renders(admin) >= 1 or not thread.is_alive():
                break
            time.sleep(0.05)
        assert thread.is_alive(), "the 4-image render ended before it could be seen in flight"
        refused = http.post("/v1/renders", json={"prompt": "one more", "seed": 2}, headers=_bearer(key))
        sent_while_in_flight = thread.is_alive()
        # the other tenant's render is not refused: it waits for the renderer (the next batch) and renders
        other = http.post("/v1/renders", json={"prompt": "another tenant", "seed": 3}, headers=_bearer(other_key))
    finally:
        thread.join()
    error = assert_error_shape(refused, 429)
    assert error["code"] == "too_many_images" and int(refused.headers["retry-after"]) >= 1, error
    assert "this key has 4 images" in error["message"] and "(limit 4)" in error["message"], error
    assert sent_while_in_flight, "the 4-image render ended before the probe: nothing was tested"
    assert other.status_code == 200, other.text[:300]
    assert big["response"].status_code == 200 and len(big["response"].json()["images"]) == 4
    again = http.post("/v1/renders", json={"prompt": "room again", "seed": 4}, headers=_bearer(key))
    assert again.status_code == 200, again.text[:300]  # the images came back


def test_a_running_jobs_images_count_against_its_key(service, http):
    """Jobs dispatch through the same renderers: a job's images fill its key's share like a sync render's do."""
    key = _new_key("limits-images")  # TEST_INGRESS: 4 images in the renderers at once
    job = http.post("/v1/jobs", json={**LONG_JOB, "num_images": 4}, headers=_bearer(key)).json()
    seen: list[int] = []
    try:
        for i in range(300):
            status = http.get(f"/v1/jobs/{job['job_id']}", headers=_bearer(key)).json()["status"]
            if status not in ("queued", "running"):
                break
            if status == "running":
                probe = http.post("/v1/renders", json={"prompt": "beside a job", "seed": i}, headers=_bearer(key))
                seen.append(probe.status_code)
                if probe.status_code == 429:
                    assert assert_error_shape(probe)["code"] == "too_many_images"
                    break
            time.sleep(0.1)
    finally:
        _cancel(http, key, job["job_id"])
    assert seen and seen[-1] == 429, (status, seen)


def test_a_stream_past_its_lifetime_says_reconnect_and_resumes(service, http):
    key = _new_key("limits-lifetime")  # TEST_INGRESS: streams end after 1 s
    job = http.post("/v1/jobs", json={**LONG_JOB, "num_images": 4}, headers=_bearer(key)).json()
    try:
        with http.stream("GET", f"/v1/jobs/{job['job_id']}/events", headers=_bearer(key)) as response:
            assert response.status_code == 200
            lines = list(response.iter_lines())
        ids = [int(line[4:]) for line in lines if line.startswith("id: ")]
        kinds = [line[7:] for line in lines if line.startswith("event: ")]
        assert ids and kinds[-1] == "reconnect", lines  # the job is still running: told to come back
        assert not {"done", "failed", "cancelled"} & set(kinds), kinds
        with http.stream(
            "GET", f"/v1/jobs/{job['job_id']}/events", headers={**_bearer(key), "Last-Event-ID": str(ids[-1])}
        ) as resumed:
            assert resumed.status_code == 200
            more = [int(line[4:]) for line in resumed.iter_lines() if line.startswith("id: ")]
        assert all(i > ids[-1] for i in more), (ids, more)
    finally:
        _cancel(http, key, job["job_id"])


def test_a_sync_render_past_its_time_limit_is_a_504_and_the_service_goes_on(service, keys, http, admin):
    """``sync_timeout_s``: a synchronous render still running at the limit ends with 504 ``timeout`` in the usual
    error shape, its call to the renderer is cancelled (no orphan render), and the next request renders as before."""
    from imagegen.serve.config import INGRESS_NAME

    app = next(a for a in service.config["applications"] if a["name"] == "imagegen")
    original = dict(next(d for d in app["deployments"] if d["name"] == INGRESS_NAME).get("user_config") or {})
    body = {"preset": "tiny-flux", "prompt": "too slow for its limit", "seed": 3, "steps": 12}

    def until(status: int) -> httpx.Response:
        for _ in range(300):  # the new user_config reaches the replica within seconds
            response = http.post("/v1/renders", json=body, headers={"Authorization": f"Bearer {keys.render}"})
            if response.status_code == status:
                return response
            threading.Event().wait(0.1)
        raise AssertionError(f"never {status}: {response.status_code} {response.text[:300]}")

    cancelled = cancelled_total(admin.metrics(), "tiny-flux")
    deploy_user_config(service, INGRESS_NAME, {**original, "sync_timeout_s": 0.05})
    try:
        late = until(504)
        error = assert_error_shape(late, 504)
        assert error["code"] == "timeout" and "longer than" in error["message"], error
        assert cancelled_total(admin.metrics(), "tiny-flux") > cancelled
    finally:
        deploy_user_config(service, INGRESS_NAME, original)
    again = until(200)
    assert again.json()["images"][0]["png_base64"]
