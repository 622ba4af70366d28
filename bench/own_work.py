"""imagegen's own per-request work in one process, without Ray: what its code costs, apart from Ray's hops.

The real ``Ingress`` (its stores, key check, render service, audit writer) and its FastAPI app, driven over
httpx's ASGI transport; every call the ingress makes to a renderer runs a real ``RendererActor`` in this process
(``render_isolated``: prepare, render, score, watermark, stamp, the one PNG encode). A request's own work is its
latency less the render (``total_s``): the ingress's routes and service, the replica's bookkeeping, the stamp and
the client's side of the ASGI call. ``bench/serve_load.py`` measures the same work inside Ray's processes, where
Ray's hops and the machine's other processes add their noise; this figure moves only with imagegen's code:

    .venv/bin/python bench/own_work.py [--requests 300] [--canned] [--cprofile out/own_work.prof] [--json out.json]

``--canned`` stamps one rendered image again and again instead of rendering: the same code without a render
before it, hot in the caches. After a real render the same code runs about twice as long (the render's tensors
have evicted it), which is the figure a served request pays. Prints a table and a JSON line: ``own_work_p50_ms``
(and p90), ``render_p50_ms``, the ``Server-Timing`` phases' medians (``phases_p50_ms``), ``requests``, ``mode``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import cProfile
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from serve_load import body as request_body  # the same request as the served bench's (bench/ is on the path)
from serve_load import percentile


class InProcessRenderer:
    """Stands where a renderer deployment's handle stands (``options(...).remote(call)``), calling a real
    ``RendererActor`` in this process; ``canned``: the first render's result stamped again, no render."""

    def __init__(self, actor: Any, canned: bool):
        self.actor = actor
        self.canned = canned
        self.result: Any = None
        self.renders: list[float] = []

    def options(self, **_: Any) -> InProcessRenderer:
        return self

    def remote(self, call: Any) -> Any:
        return self._render(call)

    async def _render(self, call: Any) -> Any:
        if not self.canned:
            [image] = self.actor.render_isolated([call])
            self.renders.append(image.timings.get("total_s", 0.0))
            return image
        if self.result is None:  # the one render a canned run makes
            self.result = self.actor.renderer.render([call.request])[0]
        result = copy.copy(self.result)
        result.timings = dict(self.result.timings)
        [image] = self.actor.finish_all([call], [result], isolate=True)
        self.renders.append(0.0)
        return image


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from imagegen.serve.actors import RendererActor
    from imagegen.serve.auth import create_key
    from imagegen.serve.http.app import build_api
    from imagegen.serve.http.timing import parse_header
    from imagegen.serve.ingress import in_one_process

    renderer = InProcessRenderer(RendererActor(args.preset), args.canned)
    profiler = cProfile.Profile() if args.cprofile else None
    latencies: list[float] = []
    phases: list[dict[str, float]] = []
    with in_one_process({args.preset: renderer}, [args.preset]) as ingress:
        # one key sends every request, back to back (canned ones by the hundred a second): no per-key rate limit
        ingress.reconfigure({"key_rate_per_s": 1e6, "key_burst": 1_000_000})
        _, secret = create_key(ingress.store, "own-work-bench", ["render"])
        transport = httpx.ASGITransport(app=build_api(ingress))
        headers = {"Authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://imagegen", headers=headers) as client:
            for i in range(args.warmup + args.requests):
                measured = i >= args.warmup
                if measured and profiler is not None:
                    profiler.enable()
                started = time.perf_counter()
                response = await client.post("/v1/renders", json=request_body(args, i))
                elapsed = time.perf_counter() - started
                if measured and profiler is not None:
                    profiler.disable()
                if response.status_code != 200:
                    raise SystemExit(f"the render answered {response.status_code}: {response.text[:300]}")
                if measured:
                    latencies.append(elapsed)
                    phases.append(parse_header(response.headers.get("server-timing", "")))
        await ingress.service.audit.flush()
    renders = renderer.renders[-len(latencies) :]
    own = [(latency - render) * 1000 for latency, render in zip(latencies, renders, strict=True)]
    if profiler is not None:
        Path(args.cprofile).parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(args.cprofile)
    # a canned request's `render` phase is the first render's, stamped again: not this request's
    names = sorted({name for p in phases for name in p if not (args.canned and name == "render")})
    return {
        "mode": "canned" if args.canned else "render",
        "preset": args.preset,
        "size": args.size,
        "steps": args.steps,
        "requests": len(own),
        "own_work_p50_ms": round(statistics.median(own), 3),
        "own_work_p90_ms": round(percentile(own, 90), 3),
        "render_p50_ms": round(statistics.median(renders) * 1000, 2),
        "phases_p50_ms": {n: round(statistics.median(p.get(n, 0.0) for p in phases), 3) for n in names},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-flux")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--canned", action="store_true", help="stamp one rendered image again: no render")
    parser.add_argument("--cprofile", help="write a cProfile of the measured requests here")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("IMAGEGEN_HOME", tempfile.mkdtemp(prefix="own-work-"))
    os.environ.setdefault("IMAGEGEN_ALLOW_UNVERIFIED_AGE", "1")  # development only, as the demo sets it

    import torch

    torch.set_num_threads(1)  # as a renderer replica at one CPU
    from imagegen.pipelines.assets import prepare
    from imagegen.pipelines.presets import get_preset

    prepare(get_preset(args.preset))
    figures = asyncio.run(measure(args))
    table = Table(title=f"imagegen's own work in one process ({figures['mode']}, {figures['requests']} requests)")
    table.add_column("figure")
    table.add_column("ms", justify="right")
    for name in ("own_work_p50_ms", "own_work_p90_ms", "render_p50_ms"):
        table.add_row(name, f"{figures[name]:.3f}")
    for name, value in figures["phases_p50_ms"].items():
        table.add_row(f"server-timing {name}", f"{value:.3f}")
    Console(stderr=True).print(table)
    line = json.dumps(figures)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")


if __name__ == "__main__":
    main()
