"""The renderer replica's adaptive batching and warm-up.

Two halves. In-process: the real ``RendererDeployment`` class (its Serve decorator peeled off) on
the tiny FLUX preset, driven on one asyncio loop exactly as a replica's event loop drives it, so
arrival order is under the test's control and every assertion is on what the batcher recorded
(batch sizes, ``batch_wait_s`` — exactly 0.0 when a batch was not held — and ids), never on wall
time. Over HTTP: the shared local Ray Serve service of ``conftest.py`` (no second cluster): its
``/readyz`` reports warm renderers, and a renderer reconfigured through its ``user_config`` with a
2 s bound still answers a lone request without holding it.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import httpx
import pytest

from imagegen.pipelines.presets import get_preset
from imagegen.pipelines.types import RenderRequest
from imagegen.pipelines.warmup import WarmupError, warm_up
from imagegen.serve.actors import RenderCall, RenderedImage, RenderError, request_tag
from imagegen.serve.config import RendererConfig
from imagegen.serve.renderer_deployment import BatchPolicy, RendererDeployment, StepProgress
from tests.serve.conftest import deploy_user_config, wait_ready

PRESET = "tiny-flux"
#: a bound no test should ever sit through: a batch held for it shows in batch_wait_s
LARGE_BOUND_S = 2.0
LONG_STEPS = 50  # the tiny presets' max_steps: a render that is surely still going when others arrive


# -- the rule itself -------------------------------------------------------------------------------
def calls(*request_ids: str) -> list[RenderCall]:
    return [RenderCall(RenderRequest(prompt="p"), request_id=r) for r in request_ids]


def test_policy_expects_the_callers_of_the_last_batch_back():
    config = RendererConfig(max_batch_size=8, batch_wait_timeout_s=0.05, adaptive_window_s=1.0)
    policy = BatchPolicy()
    assert policy.target(1, now=0.0, config=config) == 1  # a fresh replica expects nobody else
    policy.batch_ended(calls("a"), [], now=10.0)  # a lone caller
    assert policy.target(1, now=10.1, config=config) == 1
    policy.batch_ended(calls(*"abcdefgh"), [], now=20.0)  # eight closed-loop clients
    assert policy.target(1, now=20.02, config=config) == 8  # the first of them back waits for the rest
    assert policy.target(1, now=21.5, config=config) == 1  # ... but not after a quiet spell
    policy.batch_ended(calls("x"), calls("x", "x", "x"), now=30.0)  # image 1 of 4; its siblings are queued
    assert policy.target(3, now=30.0, config=config) == 3  # the siblings go without waiting for their own caller
    policy.batch_ended(calls("a"), calls("b", "c"), now=40.0)  # back to back: two queued, one caller to come back
    assert policy.target(2, now=40.0, config=config) == 3
    assert policy.target(20, now=40.0, config=config) == 8  # never above max_batch_size
    fixed = config.model_copy(update={"adaptive_batch_wait": False})
    assert policy.target(1, now=99.0, config=fixed) == 8  # @serve.batch's rule: wait for a full batch


# -- the replica in-process ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def replica(loop):
    """The deployment class itself (``func_or_class``), warmed with two sizes and batches 1 and 2."""
    from imagegen.pipelines.assets import prepare

    prepare(get_preset(PRESET))
    deployment = RendererDeployment.func_or_class(PRESET, warmup=True)
    loop.run_until_complete(
        deployment.reconfigure(
            {
                "max_batch_size": 4,
                "batch_wait_timeout_s": LARGE_BOUND_S,
                "warmup_sizes": [[64, 64], [32, 32]],
                "warmup_batch_sizes": [1, 2],
            }
        )
    )
    yield deployment
    loop.run_until_complete(deployment.batcher.close())


def configure(loop, replica, **changes) -> None:
    base = {
        "max_batch_size": 4,
        "batch_wait_timeout_s": LARGE_BOUND_S,
        "warmup_sizes": [[64, 64], [32, 32]],
        "warmup_batch_sizes": [1, 2],
    }
    loop.run_until_complete(replica.reconfigure({**base, **changes}))


def call(prompt: str, *, steps: int = 2, width: int = 32, progress: bool = False, request_id: str | None = None):
    request = RenderRequest(prompt=prompt, seed=1, width=width, height=width, steps=steps)
    return RenderCall(request, request_id=request_id or uuid.uuid4().hex, progress=progress)


async def outcome(replica, item: RenderCall, events: list | None = None):
    """Drive ``replica.render`` like Serve does; the last event (image or error), progress into ``events``."""
    last = None
    async for event in replica.render(item):
        if events is not None:
            events.append(event)
        last = event
    return last


def quiet(loop, replica) -> None:
    """One lone request: whatever the tests before left as evidence of load, the replica now expects one caller."""
    assert isinstance(loop.run_until_complete(outcome(replica, call("settle"))), RenderedImage)


async def started(events: list) -> None:
    """Until ``events`` (of a call with progress) shows its pipeline call under way."""
    while not any(isinstance(e, StepProgress) for e in events):
        await asyncio.sleep(0.01)


def test_warm_up_renders_the_configured_shapes_once(loop, replica):
    health = replica.health()
    assert health["warm"] and health["ready"] and not health["warming"]
    first = health["warmups"][0]
    shapes = {(r["size"][0], r["size"][1], r["batch"]) for r in first["renders"]}
    assert shapes == {(64, 64, 1), (64, 64, 2), (32, 32, 1), (32, 32, 2)}
    assert [m["method"] for m in first["identity"]] == get_preset(PRESET).methods  # conditioners loaded
    assert "profile" in health and health["warmup_s"] > 0
    loop.run_until_complete(replica.check_health())  # a warm replica passes Serve's check
    # a new size in the user_config warms only the new shapes, while the replica serves
    configure(loop, replica, warmup_sizes=[[64, 64], [32, 32], [48, 48]])
    later = replica.health()["warmups"]
    assert len(later) == 2 and {tuple(r["size"]) for r in later[1]["renders"]} == {(48, 48)}
    assert later[1]["identity"] == []  # identity methods are loaded once
    configure(loop, replica)  # nothing new: no warm-up at all
    assert len(replica.health()["warmups"]) == 2


def test_warm_up_refuses_a_size_the_preset_cannot_render(replica):
    with pytest.raises(WarmupError, match="warmup_sizes"):
        warm_up(replica.actor.renderer, [(1000, 1000)], [1])


def test_a_lone_request_renders_at_once_despite_a_large_bound(loop, replica):
    configure(loop, replica)
    quiet(loop, replica)
    for i in range(2):  # lone requests one after the other: none waits
        image = loop.run_until_complete(outcome(replica, call(f"alone {i}")))
        assert isinstance(image, RenderedImage), image
        assert image.batch["size"] == 1
        assert image.timings["batch_wait_s"] == 0.0  # not held at all (exactly zero)
        assert image.batch["wait"]["held_s"] == 0.0 and image.batch["wait"]["target"] == 1
        assert image.timings["queue_s"] < LARGE_BOUND_S


def test_the_fixed_wait_holds_a_lone_request(loop, replica):
    """The rule adaptive batching replaces: without it a lone request sits out the bound (here 0.2 s)."""
    configure(loop, replica, adaptive_batch_wait=False, batch_wait_timeout_s=0.2)
    try:
        image = loop.run_until_complete(outcome(replica, call("alone, fixed wait")))
        assert image.batch["size"] == 1 and image.timings["batch_wait_s"] > 0
    finally:
        configure(loop, replica)


def test_requests_arriving_during_a_batch_form_the_next_and_wait_only_for_expected_callers(loop, replica):
    """A renders; B, C, D arrive meanwhile; A's caller sends E some time after getting A's result (a
    closed-loop client; the pause stands for its round trip). The batch after A holds B, C, D open for
    the one caller it expects back, and E joins them.
    """
    configure(loop, replica)
    quiet(loop, replica)
    caller = uuid.uuid4().hex

    async def scenario():
        events: list = []
        first = asyncio.ensure_future(
            outcome(replica, call("A", steps=LONG_STEPS, progress=True, request_id=caller), events)
        )
        await started(events)
        others = [asyncio.ensure_future(outcome(replica, call(p))) for p in "BCD"]
        a = await first
        await asyncio.sleep(0.3)  # the caller's round trip (the batch is held up to 2 s for it)
        e = await outcome(replica, call("E", request_id=caller))  # the same caller, its next request
        return a, [await o for o in others], e

    a, (b, c, d), e = loop.run_until_complete(scenario())
    assert a.batch["size"] == 1 and a.timings["batch_wait_s"] == 0.0
    ids = {image.batch["id"] for image in (b, c, d, e)}
    assert len(ids) == 1, "B, C, D and the returning caller's E did not share a batch"
    assert b.batch["size"] == 4 and b.batch["wait"]["target"] == 4
    assert 0 < b.timings["batch_wait_s"] < LARGE_BOUND_S  # held open, and only until E came
    assert e.timings["queue_s"] < b.timings["queue_s"]  # E joined a batch that waited for it


def test_a_batch_is_stamped_while_the_next_one_renders_and_a_lone_request_in_the_render_thread(loop, replica):
    """A renders while B and C queue: A's image is stamped in the finishing thread while B and C render (the
    replica counts the batch), every image arrives stamped and signed, and a lone request is stamped where it
    rendered. With ``overlap_finishing`` off the renderer stamps before it takes the next batch."""

    async def scenario():
        events: list = []
        first = asyncio.ensure_future(outcome(replica, call("A", steps=LONG_STEPS, progress=True), events))
        await started(events)
        others = [asyncio.ensure_future(outcome(replica, call(p))) for p in "BC"]
        while len(replica.batcher.queue) < 2:
            await asyncio.sleep(0.01)
        return [await first] + [await o for o in others]

    for overlap in (True, False):
        configure(loop, replica, overlap_finishing=overlap)
        quiet(loop, replica)
        before = replica.health()["batching"]["finished_behind_next"]
        images = loop.run_until_complete(scenario())
        assert all(isinstance(i, RenderedImage) and i.png and i.provenance for i in images), images
        assert images[0].batch["size"] == 1 and images[1].batch["id"] == images[2].batch["id"]
        assert all(i.png.startswith(b"\x89PNG") and b"caBX" in i.png for i in images)  # each with its C2PA chunk
        quiet(loop, replica)
        health = replica.health()
        assert health["batching"]["finished_behind_next"] == before + overlap  # A's batch only, never a lone one
        assert health["batching"]["batches_finishing"] == 0  # nothing is left behind
    configure(loop, replica)


def test_requests_arriving_together_share_a_batch_and_a_bad_one_fails_alone(loop, replica):
    configure(loop, replica)
    quiet(loop, replica)

    async def together():
        good = [call(f"good {i}") for i in range(2)]
        bad = call("bad", width=30)  # not a multiple of the preset's size_multiple: invalid
        return await asyncio.gather(*(outcome(replica, c) for c in (good[0], bad, good[1])))

    first, bad, second = loop.run_until_complete(together())
    assert isinstance(bad, RenderError) and bad.code == "invalid_request" and bad.field == "width"
    assert isinstance(first, RenderedImage) and isinstance(second, RenderedImage)
    assert first.batch["id"] == second.batch["id"] and first.batch["size"] == 2
    assert first.timings["batch_wait_s"] == 0.0  # all that was expected had arrived


def test_progress_streams_then_the_image(loop, replica):
    configure(loop, replica)
    events: list = []
    last = loop.run_until_complete(outcome(replica, call("progress", steps=3, progress=True), events))
    steps = [(e.done, e.total) for e in events if isinstance(e, StepProgress)]
    assert steps == [(1, 3), (2, 3), (3, 3)] and isinstance(last, RenderedImage)
    assert events[-1] is last


def test_a_request_cancelled_while_queued_never_renders(loop, replica):
    configure(loop, replica)
    queued_id = uuid.uuid4().hex

    async def scenario():
        events: list = []
        blocker = asyncio.ensure_future(outcome(replica, call("blocker", steps=LONG_STEPS, progress=True), events))
        await started(events)
        rendered_before = replica.actor.rendered
        dropped_before = replica.batcher.dropped_queued
        doomed = asyncio.ensure_future(outcome(replica, call("doomed", request_id=queued_id)))
        while not replica.batcher.queue:
            await asyncio.sleep(0.01)
        doomed.cancel()  # what Serve does when the caller goes away
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert replica.batcher.dropped_queued == dropped_before + 1 and not replica.batcher.queue
        await blocker
        after = await outcome(replica, call("after"))
        return rendered_before, after

    rendered_before, after = loop.run_until_complete(scenario())
    assert isinstance(after, RenderedImage)
    assert replica.actor.rendered == rendered_before + 2  # the blocker and "after"; never the cancelled one
    tags = {c["request"] for c in replica.actor.recent_cancels}
    assert request_tag(queued_id) not in tags  # it never reached a pipeline call to be cancelled in


# -- the service over HTTP (the shared session service) -------------------------------------------
def renderer_health(url: str, preset: str) -> dict:
    return wait_ready(url)["checks"]["renderers"][preset]


def redeploy_renderer_config(service, preset: str, user_config: dict) -> None:
    """Change one renderer's ``user_config`` (``deploy_user_config``) and wait until its replica has taken it."""
    deploy_user_config(service, f"renderer-{preset}", user_config)
    for _ in range(600):
        health = renderer_health(service.url, preset)
        if all(health.get(k) == v for k, v in user_config.items() if not isinstance(v, list)):
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"renderer-{preset} never took the user_config {user_config}")


def test_readyz_reports_each_renderer_warm(service, http):
    ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    for preset, health in ready.json()["checks"]["renderers"].items():
        assert health["warm"] is True and health["ready"] is True, (preset, health)
        assert health["warmup_s"] > 0 and "profile" in health
        shapes = {(r["size"][0], r["size"][1], r["batch"]) for r in health["warmups"][0]["renders"]}
        batches = sorted({1, health["max_batch_size"]})
        size = get_preset(preset).defaults
        assert shapes == {(size.width, size.height, b) for b in batches}, (preset, shapes)


def test_over_http_a_lone_request_is_not_held_and_concurrent_ones_share_a_batch(service, keys):
    preset = "tiny-sdxl"
    app = next(a for a in service.config["applications"] if a["name"] == "imagegen")
    original = dict(next(d for d in app["deployments"] if d["name"] == f"renderer-{preset}")["user_config"])
    headers = {"Authorization": f"Bearer {keys.render}"}
    redeploy_renderer_config(service, preset, {**original, "batch_wait_timeout_s": LARGE_BOUND_S})
    try:
        with httpx.Client(base_url=service.url, headers=headers, timeout=120) as http:
            for i in range(2):  # sequential: the second certainly follows a lone batch
                response = http.post("/v1/renders", json={"preset": preset, "prompt": f"lone {i}", "seed": i})
                assert response.status_code == 200, response.text
            timings = response.json()["images"][0]["metadata"]["timings"]
            assert timings["batch_size"] == 1.0 and timings["batch_wait_s"] == 0.0, timings
            assert timings["queue_s"] < LARGE_BOUND_S

            # a long render occupies the replica; three requests arriving meanwhile form one batch
            blocker_id = f"blocker-{uuid.uuid4().hex[:8]}"
            results: dict[str, httpx.Response] = {}

            def post(name: str, body: dict, extra: dict | None = None) -> None:
                with httpx.Client(base_url=service.url, headers={**headers, **(extra or {})}, timeout=180) as c:
                    results[name] = c.post("/v1/renders", json={"preset": preset, **body})

            blocker = threading.Thread(
                target=post,
                args=("blocker", {"prompt": "long", "seed": 9, "steps": LONG_STEPS}, {"X-Request-Id": blocker_id}),
            )
            blocker.start()
            for _ in range(1200):
                rendering = renderer_health(service.url, preset)["rendering"]
                if rendering is not None and request_tag(blocker_id) in rendering["requests"]:
                    break
                threading.Event().wait(0.1)
            else:
                raise AssertionError("the long render never started")
            threads = [
                threading.Thread(target=post, args=(f"r{i}", {"prompt": f"together {i}", "seed": 100 + i}))
                for i in range(3)
            ]
            for t in [*threads]:
                t.start()
            for t in [blocker, *threads]:
                t.join()
        assert all(r.status_code == 200 for r in results.values()), {k: r.text[:200] for k, r in results.items()}
        sizes = [results[f"r{i}"].json()["images"][0]["metadata"]["timings"]["batch_size"] for i in range(3)]
        assert sizes == [3.0, 3.0, 3.0], sizes
    finally:
        redeploy_renderer_config(service, preset, original)
