"""Is the render slower in the Serve replica because it burns more CPU, or because it waits for a CPU?

    python bench/replica_cpu.py                  # 150 paired rounds, tiny-flux, 64 px, 4 steps
    python bench/replica_cpu.py --rounds 300 --json out.json

``bench/serve_load.py`` has found the render a few ms slower in the renderer replica than in a plain
Ray actor in some runs (and not in others). This script starts the service (configs/serve.yaml) and
a plain Ray actor holding the same ``Renderer`` with the replica's torch threads, then sends one
render to each per round (the order alternating), and reads, around each render, the Linux
scheduler's counters of the thread that renders (``/proc/<pid>/task/<tid>/schedstat`` and
``status``): CPU time on a core (``run_ms``), time runnable but waiting for a core (``wait_ms``),
time slices, voluntary and involuntary context switches. Each figure is the median over rounds of
(replica - actor), with its paired 95% BCa bootstrap interval.

The replica's counters cover its whole request (the render, then the stamp on the same thread);
``pipeline_ms`` (``timings.pipeline_s``: the denoising loop alone, timed where it ran) compares the
render itself. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from math import nan
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table
from serve_load import body, bootstrap_interval, request_fields, worker_renderer

console = Console(stderr=True)
COUNTERS = ("run_ms", "wait_ms", "slices", "voluntary_switches", "involuntary_switches")


def thread_counters(pid: int, tid: int) -> dict[str, float]:
    """The scheduler's counters of one thread (Linux): CPU ms, runqueue wait ms, slices, context switches."""
    with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
        run_ns, wait_ns, slices = (int(v) for v in handle.read().split())
    with open(f"/proc/{pid}/task/{tid}/status") as handle:
        status = dict(line.split(":\t", 1) for line in handle.read().splitlines() if ":\t" in line)
    return {
        "run_ms": run_ns / 1e6,
        "wait_ms": wait_ns / 1e6,
        "slices": float(slices),
        "voluntary_switches": float(status["voluntary_ctxt_switches"]),
        "involuntary_switches": float(status["nonvoluntary_ctxt_switches"]),
    }


def busiest_thread(pid: int, action: Any) -> int:
    """The thread of ``pid`` that used the most CPU while ``action()`` ran (the replica's pipeline thread)."""

    def cpu() -> dict[int, int]:
        out = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(tid)] = int(fields[11]) + int(fields[12])
        return out

    before = cpu()
    action()
    after = cpu()
    return max(after, key=lambda tid: after[tid] - before.get(tid, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-flux")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--port", type=int, default=18791)
    parser.add_argument("--json", help="also write the JSON document here")
    args = parser.parse_args()

    import ray

    from imagegen.serve.auth import create_key
    from imagegen.serve.launcher import start_service
    from imagegen.serve.store import ServeStore

    console.print("starting the service (configs/serve.yaml) and a plain Ray actor ...")
    service = start_service(log_to_driver=False, presets=[args.preset], port=args.port)
    try:
        with ServeStore.open() as store:
            key = create_key(store, "bench-replica-cpu", ["admin"])[1]
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=service.url, headers=headers, timeout=300) as client:

            def via_service(i: int) -> dict[str, float]:
                response = client.post("/v1/renders", json=body(args, i))
                response.raise_for_status()
                return response.json()["images"][0]["metadata"]["timings"]

            health = client.get("/readyz").json()["checks"]["renderers"][args.preset]
            actor = worker_renderer(args.preset, int(health["torch_threads"]), request_fields(body(args, 0)))
            actor_pid = ray.get(actor.pid.remote())  # it renders on its main thread
            pid = int(health["pid"])  # the renderer replica's process
            render_tid = busiest_thread(pid, lambda: [via_service(i) for i in range(4)])

            def via_actor(i: int) -> dict[str, float]:
                return ray.get(actor.render.remote(request_fields(body(args, i))))[1]

            where = {"replica": (via_service, pid, render_tid), "actor": (via_actor, actor_pid, actor_pid)}
            rows: dict[str, list[dict[str, float]]] = {"replica": [], "actor": []}
            console.print(f"{args.rounds} paired rounds ...")
            for i in range(args.rounds):
                order = ("replica", "actor") if i % 2 == 0 else ("actor", "replica")
                for arm in order:
                    render, process, thread = where[arm]
                    before = thread_counters(process, thread)
                    timings = render(i)
                    after = thread_counters(process, thread)
                    row = {name: after[name] - before[name] for name in COUNTERS}
                    row["pipeline_ms"] = timings["pipeline_s"] * 1000
                    rows[arm].append(row)
    finally:
        service.stop()

    figures: dict[str, Any] = {}
    for name in ("pipeline_ms", *COUNTERS):
        replica = [r[name] for r in rows["replica"]]
        actor = [r[name] for r in rows["actor"]]
        differences = [a - b for a, b in zip(replica, actor, strict=True)]
        interval = bootstrap_interval([differences], lambda d, axis=-1: np.median(d, axis=axis)) or [nan, nan]
        figures[name] = {
            "replica_p50": round(statistics.median(replica), 3),
            "actor_p50": round(statistics.median(actor), 3),
            "difference_p50": round(statistics.median(differences), 3),
            "difference_ci95": interval,
        }
    document = {"preset": args.preset, "size": args.size, "steps": args.steps, "rounds": args.rounds}
    document.update(at=time.strftime("%Y-%m-%d %H:%M:%S"), figures=figures)

    table = Table(title="the rendering thread per request: Serve replica vs plain Ray actor (paired)")
    for column in ("figure", "replica p50", "actor p50", "difference p50", "95% interval"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for name, f in figures.items():
        low, high = f["difference_ci95"]
        table.add_row(
            name,
            f"{f['replica_p50']:.2f}",
            f"{f['actor_p50']:.2f}",
            f"{f['difference_p50']:+.2f}",
            f"[{low:+.2f}, {high:+.2f}]",
        )
    console.print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(document, handle, indent=2)
    print(json.dumps(document))


if __name__ == "__main__":
    main()
