"""Load test of the HTTP service, and its per-request overhead against the Ray Serve floor.

    python bench/serve_load.py                              # starts configs/serve.yaml locally, tiny-flux
    python bench/serve_load.py --fixed-wait                 # the renderer without the adaptive batch wait
    python bench/serve_load.py --clients 16 --duration 30 --requests 300
    python bench/serve_load.py --url http://host:8000 --key igk_...   # an already running service (no floor arms)

Measures, in this order (so the phases do not compete for the CPU):

1. **Interleaved, concurrency 1** (``--requests`` rounds, 200 by default). Each round sends, one
   after the other and in a shuffled order (seeded: every run draws the same orders), the same request
   (prompt, seed, size, steps) to seven arms:

   * ``floor``: a bare Ray Serve app deployed by this script on the *same* local Ray, as a second
     application (``/floor``, sharing the HTTP proxy): HTTP proxy -> FastAPI ingress deployment ->
     ``DeploymentHandle`` -> a ``@serve.batch`` deployment with the renderer's max batch size and
     ``batch_wait_timeout_s`` (from the service's config), which renders nothing and returns
     ``--floor-bytes`` (5 KB) of bytes: what Ray Serve alone costs on these hops with that wait;
   * ``floor_nowait``: the same app with ``batch_wait_timeout_s = 0``: the hops alone;
   * ``floor_sized``: the no-wait floor returning as many bytes as imagegen's answer to the same
     request (a base64 PNG in JSON, ~25 KB at 64 px; read before the floor is deployed), so its hops
     carry what imagegen's carry: ``floor_sized - floor_nowait`` is what moving the image costs Ray
     alone, and ``own_work_*_sized_floor`` are the own-work figures with that taken out;
   * ``floor_working``: the sized floor whose batch deployment first *works* as long as the direct render
     (torch matmuls in one executor thread, as a replica renders off its event loop) and reports that work
     in its ``Server-Timing`` as ``render``: a bare model server's hops, a thread hand-over and a process
     that just computed included. ``floor_working_net`` is its latency less that work, and
     ``own_work_working_floor = imagegen_p50 - direct_p50 - floor_working_net_p50``: imagegen's own work
     against a bare app that also renders (a diagnostic beside the issue's formula, which keeps its floor);
   * ``imagegen``: a sync ``POST /v1/renders`` through the real service (proxy, auth, ingress,
     handle stream, batched renderer deployment, PNG + provenance, audit);
   * ``direct``: the same render on a ``Renderer`` in this process, batch 1, with the replica's torch
     thread count (``--replica-threads``), no character;
   * ``direct_worker``: the same render on a ``Renderer`` in a plain Ray actor on the same Ray (no
     Serve, no imagegen service code), timed inside the actor: what the render costs in a Ray worker
     process, where the replica's render runs, as opposed to this driver process. ``own_work_vs_worker
     = imagegen_p50 - direct_worker_p50 - floor_p50`` is the issue's own work with the render timed in
     the kind of process that serves it, and ``render_in_worker_vs_direct`` is that difference alone.

   Interleaving makes the arms share the machine's noise (other processes, CPU frequency), so
   their differences are fair on a busy machine. The order is shuffled, not rotated: a request that
   follows a long arm (a 50 ms batch wait, a render) took ~1 ms longer to reach its ingress than one
   that follows a 14 ms arm (the processes on its path had gone idle), and in a rotation each arm always
   follows the same one, so that difference landed on some arms only (it was most of imagegen's
   "outside" excess over the sized floor, 2026-12-04). ``--gap-ms`` sleeps before every arm (each
   request then meets an idle machine, as a lone request at low load does; the render in the replica
   then ran 1.5-2.4 ms slower than the direct one).
   imagegen's own per-request work is ``own_work = imagegen_p50 - direct_p50 - floor_p50`` against the
   floor that batches like the renderer does at concurrency 1: the fixed-wait floor with ``--fixed-wait``;
   with the adaptive wait (the default) a lone request is never held (each image's ``timings.batch_wait_s`` says so;
   the bench reports the largest it saw), so its floor is ``floor_nowait``. ``nowait_gap =
   imagegen_p50 - direct_p50 - floor_nowait_p50`` is printed either way. The 95% intervals are
   paired BCa bootstraps over rounds (``scipy.stats.bootstrap``) of those differences of medians.
   The render (hundreds of ms) is the noisiest term of that difference, so each arm's render is
   also timed where it ran (``timings.total_s``: prompt encode, pipeline, decode; in the replica
   for imagegen, here for direct): ``own_work_around_render = median(imagegen - its render in the
   replica) - floor p50`` is the same own work without a second render's noise (stamping, the
   replica's queue and every hop included), and ``render_in_replica_vs_direct`` says whether the
   render itself ran slower in the replica than here. ``own_work_besides_stamp`` takes the replica's
   stamp of each image (``timings.stamp_s``: watermark, metadata, PNG, C2PA signature, which the
   floor app does not do) out as well: the service's overhead apart from what it must put on an image.
   Finally the service's own account: every response's ``Server-Timing`` header
   (``imagegen.serve.http.timing``) times each phase in the process where it ran, and
   ``own_work_measured = median(total - body - hops - render)`` is imagegen's own work with Ray's body
   pull, Ray's hops to the replica and back and the render taken out, with no second render or floor
   subtracted (``own_work_measured_besides_stamp`` without the stamp; ``server_timing_p50_ms``: each
   phase's median).
2. **The service alone at concurrency 1** for ``--single-duration`` seconds, with every process's
   CPU time read from ``/proc`` before and after: **CPU ms per request** by part (renderer
   replica, ingress, Ray's HTTP proxy, Ray's control plane, this load generator).
3. **The service under load**: ``--clients`` threads each sending sync renders back to back for
   ``--duration`` seconds: throughput, latency p50/p95/p99, errors by status and code, and the
   mean pipeline batch size (from ``/metrics``).

With ``--url`` (a service this script did not start) there are no floor arms and no CPU split.
The machine's load average is recorded around phases 1 and 3 (``load_average``).

Prints a table, the JSON document (also written to ``--json`` when given) and, last, one JSON line
with the headline figures: ``floor_p50_ms``, ``floor_nowait_p50_ms``, ``imagegen_p50_ms``,
``direct_p50_ms``, ``own_work_ms`` and its interval, ``own_work_around_render_ms`` and its interval,
``own_work_measured_ms`` and its interval, ``own_work_vs_worker_ms`` and its interval,
``nowait_gap_ms`` and its interval, ``image_transport_ms`` and the ``*_sized_floor_ms`` figures
with their intervals, ``own_work_working_floor_ms`` and its interval, Ray's segments per arm
(``ray_segments_p50_ms``) and imagegen's excess per segment over the sized and the working floor
(``ray_segments_vs_sized_floor_ms``, ``ray_segments_vs_working_floor_ms``), and
``mean_batch_8_clients`` (the mean batch under ``--clients`` clients).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)

FLOOR_APP = "floor"
FLOOR_PREFIX = "/floor"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def body(args: argparse.Namespace, i: int) -> dict[str, Any]:
    return {
        "preset": args.preset,
        "prompt": f"a photo of character {i % 4} at a cafe",
        "seed": i,
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
    }


def load_average() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2), "at": time.strftime("%H:%M:%S")}


#: process command-line marker -> the part of the service it is (first match wins)
PARTS = (
    ("ServeReplica:imagegen:renderer", "renderer replica"),
    ("ServeReplica:imagegen:Ingress", "ingress replica"),
    (f"ServeReplica:{FLOOR_APP}:", "floor app replicas"),
    ("ProxyActor", "Ray HTTP proxy"),
    ("ray", "Ray control plane (controller, GCS, raylet, agents)"),
)


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (command line, user + system CPU seconds) of every process this user can read (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(entry)] = (command, (int(fields[11]) + int(fields[12])) / ticks)
    return out


def cpu_split(before: dict, after: dict, requests: int) -> dict[str, float]:
    """CPU milliseconds per request by part of the service, from two ``cpu_seconds_by_process`` snapshots."""
    split: Counter = Counter()
    for pid, (command, seconds) in after.items():
        if pid not in before:
            continue
        used = seconds - before[pid][1]
        if pid == os.getpid():
            part = "load generator (this process)"
        else:
            part = next((name for marker, name in PARTS if marker in command), None)
        if part is not None and used > 0:
            split[part] += used
    return {part: round(seconds / requests * 1000, 1) for part, seconds in split.most_common()}


# -- the floor: a bare Ray Serve app with the service's hops and no work ---------------------------
def renderer_batching(config: dict[str, Any] | None, preset: str) -> tuple[int, float, bool]:
    """(max_batch_size, batch_wait_timeout_s, adaptive_batch_wait) of ``preset``'s renderer in the deployed config."""
    from imagegen.serve.config import RendererConfig

    user_config: dict[str, Any] = {}
    for app in (config or {}).get("applications") or []:
        for deployment in app.get("deployments") or []:
            if deployment.get("name") == f"renderer-{preset}":
                user_config = deployment.get("user_config") or {}
    parsed = RendererConfig.model_validate(user_config)  # the defaults for what the config leaves out
    return parsed.max_batch_size, parsed.batch_wait_timeout_s, parsed.adaptive_batch_wait


def imagegen_answer_bytes(url: str, key: str, request: dict[str, Any]) -> int:
    """The size of imagegen's HTTP answer to ``request`` (JSON with a base64 PNG): the sized floor returns as many."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
        response = client.post("/v1/renders", json=request)
        response.raise_for_status()
        return len(response.content)


def deploy_floor(
    max_batch_size: int,
    batch_wait_timeout_s: float,
    payload_bytes: int,
    sized_bytes: int,
    work_s: float,
    logging_config: Any,
) -> None:
    """Deploy the floor app on the running Serve instance (its own route prefix, the same proxy).

    Three ``@serve.batch`` deployments behind one FastAPI ingress: ``/render`` waits like the
    renderer's bound, ``/render-nowait`` does not wait at all, ``/render-nowait-sized`` does not
    wait and returns ``sized_bytes``. The classes are defined here, inside a
    function, so Ray pickles them by value: the replicas need nothing from bench/ on their path.
    """
    from fastapi import Body, FastAPI
    from fastapi.responses import Response
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    @serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 0})
    class FloorBatch:
        def __init__(self, max_batch_size: int, batch_wait_timeout_s: float, payload_bytes: int, work_s: float = 0):
            self.payload = os.urandom(payload_bytes)
            self.work_s = work_s
            self.worker = ThreadPoolExecutor(1, thread_name_prefix="floor-work") if work_s else None
            self._batch.set_max_batch_size(max_batch_size)
            self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

        def work(self) -> float:
            """CPU-bound torch work for ``work_s`` (one torch thread, as the renderer replica's), in seconds."""
            import torch

            torch.set_num_threads(1)
            started = time.perf_counter()
            matrix = torch.ones(192, 192)
            while time.perf_counter() - started < self.work_s:
                matrix @ matrix
            return time.perf_counter() - started

        @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
        async def _batch(self, items: list[dict[str, Any]]) -> list[tuple[bytes, float]]:
            worked = await asyncio.get_running_loop().run_in_executor(self.worker, self.work) if self.worker else 0.0
            return [(self.payload, worked) for _ in items]

        async def __call__(self, item: dict[str, Any]) -> tuple[bytes, float, float]:
            """The payload, the seconds this call spent in the replica (as imagegen's ``replica_s``) and of those
            the seconds of work."""
            arrived = time.perf_counter()
            payload, worked = await self._batch(item)
            return payload, time.perf_counter() - arrived, worked

    class FloorTiming:
        """The floor's own account of the phases imagegen's ``Server-Timing`` gives that are Ray's: ``body``
        (arrival at the ingress to the body received) and ``total`` (arrival to the response's start) here, and
        from the route ``renderer`` (the handle call) and ``hops`` (of that, what the batch replica did not
        spend on the call)."""

        def __init__(self, app: Any):
            self.app = app

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            started = time.perf_counter()
            phases: dict[str, float] = {}

            async def timed_receive() -> dict:
                message = await receive()
                if message.get("type") == "http.request" and not message.get("more_body") and "body" not in phases:
                    phases["body"] = time.perf_counter() - started
                return message

            async def timed_send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    phases["total"] = time.perf_counter() - started
                    header = ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in phases.items())
                    message = {**message, "headers": [*message.get("headers", []), (b"server-timing", header.encode())]}
                await send(message)

            await self.app(scope, timed_receive, timed_send)

    api = FastAPI()
    api.add_middleware(FloorTiming)

    @serve.deployment(name="FloorIngress", max_ongoing_requests=100, ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class FloorIngress:
        def __init__(
            self,
            waiting: DeploymentHandle,
            nowait: DeploymentHandle,
            sized: DeploymentHandle,
            working: DeploymentHandle,
        ):
            self.waiting = waiting
            self.nowait = nowait
            self.sized = sized
            self.working = working

        @staticmethod
        async def call(handle: DeploymentHandle, item: dict) -> Response:
            started = time.perf_counter()
            payload, in_replica, worked = await handle.remote(item)
            renderer = time.perf_counter() - started
            timing = f"renderer;dur={renderer * 1000:.2f}, hops;dur={(renderer - in_replica) * 1000:.2f}"
            if worked:
                timing += f", render;dur={worked * 1000:.2f}"
            return Response(payload, media_type="application/octet-stream", headers={"server-timing": timing})

        @api.post("/render")
        async def render(self, item: dict = Body(...)) -> Response:  # noqa: B008 - FastAPI's idiom
            return await self.call(self.waiting, item)

        @api.post("/render-nowait")
        async def render_nowait(self, item: dict = Body(...)) -> Response:  # noqa: B008 - FastAPI's idiom
            return await self.call(self.nowait, item)

        @api.post("/render-nowait-sized")
        async def render_nowait_sized(self, item: dict = Body(...)) -> Response:  # noqa: B008 - FastAPI's idiom
            return await self.call(self.sized, item)

        @api.post("/render-nowait-working")
        async def render_nowait_working(self, item: dict = Body(...)) -> Response:  # noqa: B008 - FastAPI's idiom
            return await self.call(self.working, item)

    app = FloorIngress.bind(
        FloorBatch.options(name="FloorBatch").bind(max_batch_size, batch_wait_timeout_s, payload_bytes),
        FloorBatch.options(name="FloorBatchNoWait").bind(max_batch_size, 0.0, payload_bytes),
        FloorBatch.options(name="FloorBatchSized").bind(max_batch_size, 0.0, sized_bytes),
        FloorBatch.options(name="FloorBatchWorking").bind(max_batch_size, 0.0, sized_bytes, work_s),
    )
    serve.run(app, name=FLOOR_APP, route_prefix=FLOOR_PREFIX, logging_config=logging_config)


def request_fields(payload: dict[str, Any]) -> dict[str, Any]:
    """A render body's ``RenderRequest`` fields (the body less its ``preset``)."""
    return {k: v for k, v in payload.items() if k != "preset"}


def worker_renderer(preset: str, threads: int, warm_request: dict[str, Any]) -> Any:
    """A plain Ray actor holding a warm ``Renderer`` with ``threads`` torch threads (the ``direct_worker`` arm).

    ``num_cpus=0`` like the replica's placement-free helpers, so it fits beside the service; its
    ``render(request)`` answers (wall seconds of ``Renderer.render`` inside the actor, the image's
    ``timings``) and ``pid()`` its process id (it renders on its main thread, whose id is the pid).
    """
    import ray

    @ray.remote(num_cpus=0)
    class WorkerRenderer:
        def __init__(self) -> None:
            import torch

            from imagegen.pipelines.renderer import Renderer
            from imagegen.pipelines.types import RenderRequest

            torch.set_num_threads(threads)
            self.request_type = RenderRequest
            self.renderer = Renderer(preset)

        def render(self, request: dict[str, Any]) -> tuple[float, dict[str, float]]:
            started = time.perf_counter()
            [result] = self.renderer.render([self.request_type(**request)])
            return time.perf_counter() - started, dict(result.timings)

        def pid(self) -> int:
            return os.getpid()

    actor = WorkerRenderer.remote()
    ray.get(actor.render.remote(warm_request))  # loaded and warm before the rounds start
    return actor


def worker_imagegen_file() -> str:
    """``imagegen.__file__`` as a Ray worker of this cluster imports it (the replicas' view)."""
    import ray

    def where() -> str:
        import imagegen

        return imagegen.__file__

    return ray.get(ray.remote(num_cpus=0)(where).remote())


# -- phase 1: floors, imagegen and direct, interleaved ----------------------------------------------
ARMS = ("floor", "floor_nowait", "floor_sized", "floor_working", "imagegen", "direct", "direct_worker")


def post_timed(client: httpx.Client, path: str, payload: dict[str, Any]) -> tuple[float, httpx.Response]:
    """(seconds, response) of one POST, its body read."""
    started = time.perf_counter()
    response = client.post(path, json=payload)
    response.read()
    return time.perf_counter() - started, response


def bootstrap_interval(
    samples: list[Any], statistic: Any, rng_seed: int = 0, method: str = "BCa"
) -> list[float] | None:
    """95% bootstrap interval, BCa by default (paired resampling when more than one sample); BCa degenerates
    on heavily tied samples (durations in 0.01 ms), and then the percentile bootstrap's interval is given."""
    import numpy as np
    from scipy.stats import bootstrap

    try:
        result = bootstrap(
            tuple(np.asarray(s) for s in samples),
            statistic,
            paired=len(samples) > 1,
            vectorized=True,
            confidence_level=0.95,
            n_resamples=9999,
            method=method,
            rng=np.random.default_rng(rng_seed),
        )
    except (ValueError, TypeError) as exc:  # too few rounds, degenerate sample
        console.print(f"[yellow]bootstrap failed: {exc}[/yellow]")
        return None
    low, high = result.confidence_interval
    if (math.isnan(low) or math.isnan(high)) and method != "percentile":
        return bootstrap_interval(samples, statistic, rng_seed, method="percentile")
    return [round(float(low), 2), round(float(high), 2)]


def arm_figures(seconds: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2) if ms else None,
        "p95_ms": round(percentile(ms, 95), 2) if ms else None,
        "mean_ms": round(statistics.fmean(ms), 2) if ms else None,
    }


def gap_around_render(times: dict[str, list[float]], replica_render: list[float], floor_arm: str) -> dict[str, Any]:
    """``imagegen - its render as timed in the replica - <floor_arm>``, in ms, with its paired 95% interval.

    The same own work as :func:`gap` without the direct arm: the render's own time (hundreds of ms,
    the noisiest term) is taken from the replica that ran it instead of a second render in this
    process, so what is left is the hops and imagegen's work around the render (stamping included).
    """
    import numpy as np

    floor_ms, imagegen_ms = (np.asarray(times[a]) * 1000 for a in (floor_arm, "imagegen"))
    around_ms = imagegen_ms - np.asarray(replica_render) * 1000

    def medians(f, a, axis=-1):
        return np.median(a, axis=axis) - np.median(f, axis=axis)

    return {
        "ms": round(float(np.median(around_ms) - np.median(floor_ms)), 2),
        "ci95_ms": bootstrap_interval([floor_ms, around_ms], medians),
    }


#: Server-Timing phases that are not imagegen's own work: Ray's body pull from its proxy, Ray's hops to the
#: renderer replica and back, and the render itself
NOT_OWN_PHASES = ("body", "hops", "render")


def own_work_measured(phases: list[dict[str, float]], without: tuple[str, ...] = ()) -> dict[str, Any]:
    """imagegen's own work as the service measured it: per request, the ingress's ``total`` (arrival to the
    response's start) minus ``NOT_OWN_PHASES`` (and ``without``); the median in ms with its 95% interval.

    No second render and no floor app are subtracted, so neither one's noise is in it; what it leaves out is
    Ray's proxy-to-ingress and ingress-to-proxy transfers, which the floor app pays in the same way.
    """
    import numpy as np

    skipped = NOT_OWN_PHASES + without
    own = [p["total"] - sum(p.get(name, 0.0) for name in skipped) for p in phases if "total" in p and "render" in p]
    if not own:
        return {"ms": None, "ci95_ms": None}
    return {"ms": round(float(np.median(own)), 2), "ci95_ms": bootstrap_interval([np.asarray(own)], np.median)}


#: where an HTTP arm's time goes, from its Server-Timing header (imagegen's, or the floor's FloorTiming):
#: ``outside`` (the latency less the ingress's ``total``: Ray's proxy, its call to the ingress and the answer's
#: way back), ``body`` (Ray pulling the body from its proxy), ``hops`` (the handle call less the time in the
#: replica) and ``inside`` (the rest of the ingress's ``total``, less the render and stamp for imagegen: the
#: app's own work, FastAPI's included)
SEGMENTS = ("outside", "body", "hops", "inside")


def ray_segments(latency_s: float, phases_ms: dict[str, float]) -> dict[str, float]:
    """One response's :data:`SEGMENTS` in seconds (empty when its header lacks a phase)."""
    if not all(name in phases_ms for name in ("total", "body", "hops")):
        return {}
    total, body, hops = (phases_ms[name] / 1000 for name in ("total", "body", "hops"))
    replica_work = sum(phases_ms.get(name, 0.0) for name in ("queue", "render", "stamp")) / 1000
    return {"outside": latency_s - total, "body": body, "hops": hops, "inside": total - body - hops - replica_work}


def segment_differences(segments: dict[str, list[dict[str, float]]], arm: str, floor_arm: str) -> dict[str, Any]:
    """Per segment, ``median(arm) - median(floor_arm)`` in ms with its paired 95% interval: which of Ray's
    segments (or the app's own) carries what ``arm`` costs over the floor."""
    pairs = [(a, f) for a, f in zip(segments[arm], segments[floor_arm], strict=True) if a and f]
    series = {name: {arm: [a[name] for a, _ in pairs], floor_arm: [f[name] for _, f in pairs]} for name in SEGMENTS}
    return {name: floor_difference(series[name], arm, floor_arm) for name in SEGMENTS}


def render_difference(renders: dict[str, list[float]], where: str = "replica") -> dict[str, Any]:
    """The render in the replica (or ``where``) minus the same render in this process (timings.total_s), ms,
    paired."""
    import numpy as np

    diff = (np.asarray(renders[where]) - np.asarray(renders["direct"])) * 1000
    return {"paired_median_ms": round(float(np.median(diff)), 2), "ci95_ms": bootstrap_interval([diff], np.median)}


def floor_difference(times: dict[str, list[float]], larger: str, smaller: str) -> dict[str, Any]:
    """``<larger>_p50 - <smaller>_p50`` of two arms' seconds in ms, with its paired 95% interval."""
    import numpy as np

    larger_ms, smaller_ms = (np.asarray(times[a]) * 1000 for a in (larger, smaller))

    def medians(big, small, axis=-1):
        return np.median(big, axis=axis) - np.median(small, axis=axis)

    return {
        "ms": round(float(np.median(larger_ms) - np.median(smaller_ms)), 2),
        "ci95_ms": bootstrap_interval([larger_ms, smaller_ms], medians),
    }


def gap(times: dict[str, list[float]], floor_arm: str, direct_arm: str = "direct") -> dict[str, Any]:
    """``imagegen_p50 - <direct_arm>_p50 - <floor_arm>_p50`` in ms with its paired bootstrap 95% interval."""
    import numpy as np

    floor_ms, imagegen_ms, direct_ms = (np.asarray(times[a]) * 1000 for a in (floor_arm, "imagegen", direct_arm))

    def medians(f, i, d, axis=-1):
        return np.median(i, axis=axis) - np.median(d, axis=axis) - np.median(f, axis=axis)

    paired = imagegen_ms - direct_ms - floor_ms
    return {
        "ms": round(float(np.median(imagegen_ms) - np.median(direct_ms) - np.median(floor_ms)), 2),
        "ci95_ms": bootstrap_interval([floor_ms, imagegen_ms, direct_ms], medians),
        # the median of the per-round differences, and its interval (a second view of the same rounds)
        "paired_median_ms": round(float(np.median(paired)), 2),
        "paired_median_ci95_ms": bootstrap_interval([paired], np.median),
    }


def put_figure(summary: dict[str, Any], name: str, figure: dict[str, Any]) -> None:
    """``summary[<name>_ms]`` and ``summary[<name>_ci95_ms]`` from a figure of :func:`gap` (its ``ms``) or
    :func:`render_difference` (its ``paired_median_ms``)."""
    summary[f"{name}_ms"] = figure["ms"] if "ms" in figure else figure["paired_median_ms"]
    summary[f"{name}_ci95_ms"] = figure["ci95_ms"]


def interleaved(
    client: httpx.Client, renderer: Any, args: argparse.Namespace, floor: bool, adaptive: bool, worker: Any = None
) -> dict[str, Any]:
    """``--requests`` rounds of one request per arm, the arms' order shuffled every round (``worker``: the
    ``direct_worker`` arm's actor, None without it)."""
    import ray

    from imagegen.pipelines.types import RenderRequest
    from imagegen.serve.http.timing import parse_header

    arms = [a for a in ARMS if (floor or not a.startswith("floor")) and (worker is not None or a != "direct_worker")]
    times: dict[str, list[float]] = {a: [] for a in arms}
    sizes: dict[str, list[int]] = {a: [] for a in arms if not a.startswith("direct")}
    paths = {
        "floor": f"{FLOOR_PREFIX}/render",
        "floor_nowait": f"{FLOOR_PREFIX}/render-nowait",
        "floor_sized": f"{FLOOR_PREFIX}/render-nowait-sized",
        "floor_working": f"{FLOOR_PREFIX}/render-nowait-working",
        "imagegen": "/v1/renders",
    }
    held: list[float] = []  # timings.batch_wait_s of imagegen's images: how long the replica held each
    # the render itself as timed where it ran (prompt encode + pipeline + decode: timings.total_s),
    # in the replica for imagegen and in this process for the direct arm, per complete round
    # and timings.stamp_s: the replica's watermark, metadata, PNG encode and C2PA signature of that image
    renders: dict[str, list[float]] = {"replica": [], "direct": [], "stamp": [], "worker": [], "floor_work": []}
    # the service's own account of each imagegen request (its Server-Timing header), per complete round
    phases: list[dict[str, float]] = []
    # Ray's segments of each HTTP arm per complete round (see ray_segments), from its Server-Timing header
    segments: dict[str, list[dict[str, float]]] = {a: [] for a in arms if a in paths}
    errors: Counter = Counter()
    load_before = load_average()
    started = time.monotonic()
    shuffled = random.Random(0)
    for r in range(args.requests):
        payload = body(args, r)
        fields = request_fields(payload)
        request = RenderRequest(**fields)
        round_times: dict[str, float] = {}
        round_renders: dict[str, float] = {}
        round_phases: dict[str, float] = {}
        round_segments: dict[str, dict[str, float]] = {}
        order = shuffled.sample(arms, len(arms))  # each arm after any other (see the module docstring)
        for arm in order:
            time.sleep(args.gap_ms / 1000)
            if arm == "direct":
                t0 = time.perf_counter()
                [result] = renderer.render([request])
                round_times["direct"] = time.perf_counter() - t0
                round_renders["direct"] = result.timings["total_s"]
                continue
            if arm == "direct_worker":
                round_times[arm], timed = ray.get(worker.render.remote(fields))
                round_renders["worker"] = timed["total_s"]
                continue
            elapsed, response = post_timed(client, paths[arm], payload)
            if response.status_code != 200:
                errors[f"{arm} {response.status_code}"] += 1
                continue
            round_times[arm] = elapsed
            sizes[arm].append(len(response.content))
            timing = parse_header(response.headers.get("server-timing", ""))
            round_segments[arm] = ray_segments(elapsed, timing)
            if arm == "floor_working":
                round_renders["floor_work"] = timing.get("render", float("nan")) / 1000
            if arm == "imagegen":
                timed = response.json()["images"][0]["metadata"]["timings"]
                held.append(timed.get("batch_wait_s", float("nan")))
                round_renders["replica"] = timed.get("total_s", float("nan"))
                round_renders["stamp"] = timed.get("stamp_s", float("nan"))
                round_phases = parse_header(response.headers.get("server-timing", ""))
        if len(round_times) == len(arms):  # only complete rounds count
            for arm, value in round_times.items():
                times[arm].append(value)
            for where, value in round_renders.items():
                renders[where].append(value)
            phases.append(round_phases)
            for arm, split in round_segments.items():
                segments[arm].append(split)
    wall = time.monotonic() - started
    figures = {arm: arm_figures(values) for arm, values in times.items()}
    summary: dict[str, Any] = {
        "floor_p50_ms": figures["floor"]["p50_ms"] if floor else None,
        "floor_nowait_p50_ms": figures["floor_nowait"]["p50_ms"] if floor else None,
        "floor_sized_p50_ms": figures["floor_sized"]["p50_ms"] if floor else None,
        "floor_working_p50_ms": figures["floor_working"]["p50_ms"] if floor else None,
        "imagegen_p50_ms": figures["imagegen"]["p50_ms"],
        "direct_p50_ms": figures["direct"]["p50_ms"],
        "adaptive_batch_wait": adaptive,
        "own_work_floor": None,
        "own_work_ms": None,
        "own_work_ci95_ms": None,
        "nowait_gap_ms": None,
        "nowait_gap_ci95_ms": None,
        "imagegen_batch_wait_max_ms": round(max(held) * 1000, 3) if held else None,
        "rounds": len(times["imagegen"]),
        "gap_ms": args.gap_ms,
        "server_timing_p50_ms": {
            name: round(statistics.median(p[name] for p in phases if name in p), 2)
            for name in dict.fromkeys(name for p in phases for name in p)
        },
    }
    measured, measured_unstamped = own_work_measured(phases), own_work_measured(phases, without=("stamp",))
    summary.update(
        own_work_measured_ms=measured["ms"],
        own_work_measured_ci95_ms=measured["ci95_ms"],
        own_work_measured_besides_stamp_ms=measured_unstamped["ms"],
        own_work_measured_besides_stamp_ci95_ms=measured_unstamped["ci95_ms"],
    )
    gaps: dict[str, Any] = {}
    if floor and times["floor"]:
        gaps = {arm: gap(times, arm) for arm in ("floor", "floor_nowait")}
        # the floor that batches as the renderer does at concurrency 1 (see the module docstring)
        own = "floor_nowait" if adaptive else "floor"
        gaps["around_render"] = gap_around_render(times, renders["replica"], own)
        # the same without the stamp the floor app does not make (issue 16 asks it of every image)
        stamped = [r + s for r, s in zip(renders["replica"], renders["stamp"], strict=True)]
        gaps["around_render_and_stamp"] = gap_around_render(times, stamped, own)
        gaps["render_in_replica_vs_direct"] = render_difference(renders)
        put_figure(summary, "render_in_replica_vs_direct", gaps["render_in_replica_vs_direct"])
        if "direct_worker" in times:  # the render timed in a Ray worker process, as the replica's is
            gaps["vs_worker"] = gap(times, own, "direct_worker")
            gaps["render_in_worker_vs_direct"] = render_difference(renders, "worker")
            summary["direct_worker_p50_ms"] = figures["direct_worker"]["p50_ms"]
            put_figure(summary, "own_work_vs_worker", gaps["vs_worker"])
            put_figure(summary, "render_in_worker_vs_direct", gaps["render_in_worker_vs_direct"])
        if all(segments.get(a) for a in ("imagegen", "floor_sized", "floor_working")):
            gaps["ray_segments"] = segment_differences(segments, "imagegen", "floor_sized")
            gaps["ray_segments_working"] = segment_differences(segments, "imagegen", "floor_working")
            summary["ray_segments_p50_ms"] = {
                arm: {name: round(statistics.median(s[name] for s in splits) * 1000, 2) for name in SEGMENTS}
                for arm, splits in segments.items()
                if splits and all(name in splits[0] for name in SEGMENTS)
            }
            summary["ray_segments_vs_sized_floor_ms"] = gaps["ray_segments"]
            summary["ray_segments_vs_working_floor_ms"] = gaps["ray_segments_working"]
        if renders["floor_work"]:  # the working floor less its work: a bare app that renders, without the render
            net = [t - w for t, w in zip(times["floor_working"], renders["floor_work"], strict=True)]
            times["floor_working_net"] = net
            gaps["floor_working"] = gap(times, "floor_working_net")
            put_figure(summary, "own_work_working_floor", gaps["floor_working"])
            summary["floor_working_net_p50_ms"] = round(statistics.median(times["floor_working_net"]) * 1000, 2)
            summary["floor_work_p50_ms"] = round(statistics.median(renders["floor_work"]) * 1000, 2)
        if adaptive:  # the same figures against the no-wait floor that carries imagegen's bytes
            gaps["floor_sized"] = gap(times, "floor_sized")
            gaps["around_render_sized_floor"] = gap_around_render(times, renders["replica"], "floor_sized")
            gaps["around_render_and_stamp_sized_floor"] = gap_around_render(times, stamped, "floor_sized")
            gaps["image_transport"] = floor_difference(times, "floor_sized", "floor_nowait")
            put_figure(summary, "image_transport", gaps["image_transport"])
            put_figure(summary, "own_work_sized_floor", gaps["floor_sized"])
            put_figure(summary, "own_work_around_render_sized_floor", gaps["around_render_sized_floor"])
            put_figure(summary, "own_work_besides_stamp_sized_floor", gaps["around_render_and_stamp_sized_floor"])
        summary.update(
            replica_render_p50_ms=round(statistics.median(renders["replica"]) * 1000, 2),
            direct_render_p50_ms=round(statistics.median(renders["direct"]) * 1000, 2),
            stamp_p50_ms=round(statistics.median(renders["stamp"]) * 1000, 2) if renders["stamp"] else None,
            own_work_around_render_ms=gaps["around_render"]["ms"],
            own_work_around_render_ci95_ms=gaps["around_render"]["ci95_ms"],
            own_work_besides_stamp_ms=gaps["around_render_and_stamp"]["ms"],
            own_work_besides_stamp_ci95_ms=gaps["around_render_and_stamp"]["ci95_ms"],
        )
        summary.update(
            own_work_floor=own,
            own_work_ms=gaps[own]["ms"],
            own_work_ci95_ms=gaps[own]["ci95_ms"],
            nowait_gap_ms=gaps["floor_nowait"]["ms"],
            nowait_gap_ci95_ms=gaps["floor_nowait"]["ci95_ms"],
        )
    return {
        "summary": summary,
        "arms": figures,
        "gaps": gaps,
        "response_bytes_p50": {arm: statistics.median(v) for arm, v in sizes.items() if v},
        "errors": dict(errors),
        "wall_s": round(wall, 1),
        "load_average": {"before": load_before, "after": load_average()},
    }


# -- phases 2 and 3: the service alone ---------------------------------------------------------------
def batch_figures(client: httpx.Client, preset: str) -> tuple[float, float]:
    text = client.get("/metrics").text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(f'imagegen_batch_size_sum{{preset="{preset}"}}'):
            total = float(line.split()[-1])
        elif line.startswith(f'imagegen_batch_size_count{{preset="{preset}"}}'):
            count = float(line.split()[-1])
    return total, count


def run_clients(url: str, key: str, args: argparse.Namespace, clients: int, duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: Counter = Counter()
    codes: Counter = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker(worker_id: int) -> None:
        i = worker_id * 1_000_000
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as http:
            while time.monotonic() < stop_at:
                i += 1
                started = time.perf_counter()
                response = None
                try:
                    response = http.post("/v1/renders", json=body(args, i))
                    status = response.status_code
                    code = None if status == 200 else response.json().get("error", {}).get("code")
                except (httpx.HTTPError, ValueError) as exc:
                    status, code = 0, type(exc).__name__
                elapsed = time.perf_counter() - started
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(elapsed)
                    else:
                        codes[f"{status} {code}"] += 1
                if status in (429, 503):
                    time.sleep(float(response.headers.get("retry-after", "1")) if response is not None else 1.0)
                elif status == 0:
                    time.sleep(1.0)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    ok = statuses.get(200, 0)
    return {
        "clients": clients,
        "duration_s": round(wall, 2),
        "requests": sum(statuses.values()),
        "ok": ok,
        "throughput_rps": round(ok / wall, 3),
        "latency_s": {
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "mean": statistics.fmean(latencies) if latencies else None,
        },
        "errors": dict(codes),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--preset", default="tiny-flux")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--url", help="an already running service (default: start configs/serve.yaml here)")
    parser.add_argument("--key", help="API key with the render and admin scopes (with --url)")
    parser.add_argument("--port", type=int, default=18790)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    parser.add_argument("--max-batch-size", type=int, default=None, help="override the renderers' max_batch_size")
    parser.add_argument("--batch-wait", type=float, default=None, help="override batch_wait_timeout_s (seconds)")
    parser.add_argument(
        "--fixed-wait", action="store_true", help="the renderers without the adaptive wait (adaptive_batch_wait: false)"
    )
    parser.add_argument("--replica-threads", type=int, default=1, help="torch threads of the direct arm")
    parser.add_argument("--requests", type=int, default=200, help="interleaved rounds (requests per arm)")
    parser.add_argument("--floor-bytes", type=int, default=5120, help="bytes the floor app returns")
    parser.add_argument(
        "--gap-ms", type=float, default=0.0, help="quiet gap before every arm of the interleaved phase (ms)"
    )
    parser.add_argument("--single-duration", type=float, default=8.0, help="seconds of the CPU-split phase")
    parser.add_argument("--json", help="also write the JSON document here")
    args = parser.parse_args()

    import imagegen
    from imagegen.serve import data_plane

    console.print(f"imagegen imported from {imagegen.__file__}")
    # before this process imports Ray Serve: the floor's handles are made here and take this process's data plane,
    # so the floor runs on the one the launcher gives imagegen (a bare app with the same hops, on the same Ray)
    data_plane.apply()
    import torch

    from imagegen.pipelines.renderer import Renderer
    from imagegen.pipelines.types import RenderRequest

    console.print(f"direct Renderer ({args.preset}, {args.size}px, {args.steps} steps) ...")
    torch.set_num_threads(args.replica_threads)
    renderer = Renderer(args.preset)
    renderer.render([RenderRequest(**request_fields(body(args, 0)))])
    walls = []
    for _ in range(7):  # how long the working floor works: the direct render's wall time (prompt encoded once)
        started = time.perf_counter()
        renderer.render([RenderRequest(**request_fields(body(args, 0)))])
        walls.append(time.perf_counter() - started)
    work_s = statistics.median(walls)
    console.print(f"the direct render takes {work_s * 1000:.1f} ms: the working floor works as long")

    service = None
    url, key = args.url, args.key
    worker_file = None
    if url is None:
        from imagegen.serve.auth import create_key
        from imagegen.serve.launcher import start_service
        from imagegen.serve.store import ServeStore

        console.print("starting the service (configs/serve.yaml) ...")
        overrides: dict[str, Any] = {"presets": [args.preset], "port": args.port, "num_cpus": args.num_cpus}
        overrides["ingress"] = {"max_inflight_renders": max(32, args.clients * 2)}
        renderer_config: dict[str, Any] = {}
        if args.max_batch_size:
            renderer_config["max_batch_size"] = args.max_batch_size
        if args.batch_wait is not None:
            renderer_config["batch_wait_timeout_s"] = args.batch_wait
        if args.fixed_wait:
            renderer_config["adaptive_batch_wait"] = False
        if renderer_config:
            overrides["renderer_config"] = renderer_config
        service = start_service(log_to_driver=False, **overrides)
        url = service.url
        with ServeStore.open() as store:
            key = create_key(store, "bench-serve-load", ["admin"])[1]
    floor_batching = None
    sized_bytes = None
    worker = None
    adaptive = not args.fixed_wait
    try:
        if service is not None:
            worker_file = worker_imagegen_file()
            console.print(f"Ray workers import imagegen from {worker_file}")
            max_batch, wait, adaptive = renderer_batching(service.config, args.preset)
            floor_batching = (max_batch, wait)
            console.print(
                f"deploying the floor app at {FLOOR_PREFIX} (max batch {max_batch}, wait {wait}s and none); "
                f"the renderer's wait is {'adaptive' if adaptive else 'fixed'} ..."
            )
            sized_bytes = imagegen_answer_bytes(url, key, body(args, 0))
            logging_config = service.config.get("logging_config")
            deploy_floor(max_batch, wait, args.floor_bytes, sized_bytes, work_s, logging_config)
            console.print("a plain Ray actor with the same Renderer (the direct_worker arm) ...")
            worker = worker_renderer(args.preset, args.replica_threads, request_fields(body(args, 0)))
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
            for i in range(3):  # warm-up: prompt cache, connections
                client.post("/v1/renders", json=body(args, i)).raise_for_status()
                if service is not None:
                    client.post(f"{FLOOR_PREFIX}/render", json=body(args, i)).raise_for_status()
                    client.post(f"{FLOOR_PREFIX}/render-nowait", json=body(args, i)).raise_for_status()
                    client.post(f"{FLOOR_PREFIX}/render-nowait-sized", json=body(args, i)).raise_for_status()
                    client.post(f"{FLOOR_PREFIX}/render-nowait-working", json=body(args, i)).raise_for_status()
            console.print(f"interleaved {' / '.join(ARMS)}, {args.requests} rounds ...")
            paired = interleaved(client, renderer, args, floor=service is not None, adaptive=adaptive, worker=worker)
            console.print(json.dumps(paired["summary"]), soft_wrap=True)
            if service is not None:
                from ray import serve

                serve.delete(FLOOR_APP)
            console.print(f"the service alone at concurrency 1 for {args.single_duration:.0f}s ...")
            cpu_before = cpu_seconds_by_process() if service is not None else None
            single = run_clients(url, key, args, 1, args.single_duration)
            if cpu_before is not None:
                single["cpu_ms_per_request"] = cpu_split(cpu_before, cpu_seconds_by_process(), single["requests"])
            before = batch_figures(client, args.preset)
            console.print(f"{args.clients} clients for {args.duration:.0f}s ...")
            load_before = load_average()
            loaded = run_clients(url, key, args, args.clients, args.duration)
            loaded["load_average"] = {"before": load_before, "after": load_average()}
            after = batch_figures(client, args.preset)
            health = client.get("/readyz").json()
    finally:
        if service is not None:
            service.stop()
    batches = after[1] - before[1]
    loaded["mean_batch_size"] = round((after[0] - before[0]) / batches, 3) if batches else None
    summary = paired["summary"]
    summary["mean_batch_8_clients" if args.clients == 8 else f"mean_batch_{args.clients}_clients"] = loaded[
        "mean_batch_size"
    ]
    direct_s = summary["direct_p50_ms"] / 1000
    overhead = summary["imagegen_p50_ms"] / 1000 - direct_s
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_end": load_average(),
        },
        "imagegen_file": imagegen.__file__,
        "worker_imagegen_file": worker_file,
        "request": {"preset": args.preset, "size": args.size, "steps": args.steps},
        "renderer": health.get("checks", {}).get("renderers", {}).get(args.preset),
        "floor_app": None
        if floor_batching is None
        else {
            "max_batch_size": floor_batching[0],
            "batch_wait_timeout_s": [floor_batching[1], 0.0],
            "bytes": args.floor_bytes,
            "sized_bytes": sized_bytes,
        },
        "renderer_adaptive_batch_wait": adaptive,
        "interleaved": paired,
        "direct_renderer": {
            "median_s": direct_s,
            "p95_s": paired["arms"]["direct"]["p95_ms"] / 1000,
            "calls": paired["arms"]["direct"]["n"],
        },
        "concurrency_1": single,
        "loaded": loaded,
        # HTTP p50 minus the direct p50, both from the interleaved phase (the floor not subtracted)
        "per_request_overhead_s": round(overhead, 4),
    }
    table = Table(title=f"serve load: {args.preset} {args.size}px {args.steps} steps")
    for column in ("run", "clients", "ok", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch"):
        table.add_column(column)

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    for arm, label in (
        ("direct", "direct Renderer (interleaved)"),
        ("direct_worker", "direct Renderer in a plain Ray actor (interleaved)"),
        ("floor", "bare Serve floor, same wait (interleaved)"),
        ("floor_nowait", "bare Serve floor, no wait (interleaved)"),
        ("floor_sized", "bare Serve floor, no wait, imagegen's bytes (interleaved)"),
        ("floor_working", "bare Serve floor, no wait, imagegen's bytes, a render's work (interleaved)"),
        ("imagegen", "HTTP imagegen (interleaved)"),
    ):
        figures = paired["arms"].get(arm)
        if figures:
            table.add_row(
                label,
                "1",
                str(figures["n"]),
                "-",
                f"{figures['p50_ms']:.1f}",
                f"{figures['p95_ms']:.1f}",
                "-",
                "-",
                "1" if arm == "direct" else "-",
            )
    for label, run in (("HTTP, concurrency 1 (CPU split)", single), (f"HTTP, {args.clients} clients", loaded)):
        lat = run["latency_s"]
        table.add_row(
            label,
            str(run["clients"]),
            str(run["ok"]),
            f"{run['throughput_rps']:.2f}",
            ms(lat["p50"]),
            ms(lat["p95"]),
            ms(lat["p99"]),
            str(sum(run["errors"].values())) + (f" {run['errors']}" if run["errors"] else ""),
            str(run.get("mean_batch_size", "-")),
        )
    Console(width=140).print(table)
    if summary["own_work_ms"] is not None:
        print(
            f"imagegen's own per-request work (imagegen p50 - direct p50 - {summary['own_work_floor']} p50): "
            f"{summary['own_work_ms']:.1f} ms, 95% CI {summary['own_work_ci95_ms']} ms"
        )
        print(
            f"imagegen's work around the render (imagegen - its render as timed in the replica - "
            f"{summary['own_work_floor']} p50): {summary['own_work_around_render_ms']:.1f} ms, "
            f"95% CI {summary['own_work_around_render_ci95_ms']} ms; the render in the replica vs here "
            f"(paired median): {result['interleaved']['gaps']['render_in_replica_vs_direct']['paired_median_ms']} ms; "
            f"of it, stamping in the replica (timings.stamp_s p50): {summary['stamp_p50_ms']} ms"
        )
        print(
            "imagegen over a direct call, minus the no-wait floor (imagegen p50 - direct p50 - floor_nowait p50): "
            f"{summary['nowait_gap_ms']:.1f} ms, 95% CI {summary['nowait_gap_ci95_ms']} ms; "
            f"largest batch_wait_s of a lone imagegen request: {summary['imagegen_batch_wait_max_ms']} ms"
        )
    if summary.get("own_work_vs_worker_ms") is not None:
        print(
            f"the same with the direct render in a plain Ray actor (imagegen p50 - direct_worker p50 - "
            f"{summary['own_work_floor']} p50): {summary['own_work_vs_worker_ms']:.1f} ms, "
            f"95% CI {summary['own_work_vs_worker_ci95_ms']} ms; the render in a Ray worker vs here (paired median): "
            f"{summary['render_in_worker_vs_direct_ms']} ms {summary['render_in_worker_vs_direct_ci95_ms']}"
        )
    if summary.get("image_transport_ms") is not None:
        print(
            f"moving imagegen's answer ({sized_bytes} bytes) instead of {args.floor_bytes} through the same hops "
            f"(floor_sized p50 - floor_nowait p50): {summary['image_transport_ms']:.1f} ms, "
            f"95% CI {summary['image_transport_ci95_ms']} ms; against the sized floor: own work "
            f"{summary['own_work_sized_floor_ms']:.1f} ms {summary['own_work_sized_floor_ci95_ms']}, around the render "
            f"{summary['own_work_around_render_sized_floor_ms']:.1f} ms "
            f"{summary['own_work_around_render_sized_floor_ci95_ms']}, besides the stamp "
            f"{summary['own_work_besides_stamp_sized_floor_ms']:.1f} ms "
            f"{summary['own_work_besides_stamp_sized_floor_ci95_ms']}"
        )
    if summary.get("own_work_working_floor_ms") is not None:
        print(
            f"against a floor that works as long as the render (its latency less its {summary['floor_work_p50_ms']} ms "
            f"of work: {summary['floor_working_net_p50_ms']} ms): own work {summary['own_work_working_floor_ms']} ms "
            f"{summary['own_work_working_floor_ci95_ms']}"
        )
    print(f"per-request overhead over the direct render (imagegen p50 - direct p50): {ms(overhead)} ms")
    if single.get("cpu_ms_per_request"):
        split = Table(title="CPU per request at concurrency 1, by part")
        split.add_column("part")
        split.add_column("CPU ms / request", justify="right")
        for part, value in single["cpu_ms_per_request"].items():
            split.add_row(part, f"{value:.1f}")
        Console(width=140).print(split)
    document = json.dumps(result, indent=2)
    print(document)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(document + "\n")
    print(json.dumps(summary))  # the headline figures, last


if __name__ == "__main__":
    main()
