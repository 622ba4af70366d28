"""Load test of the HTTP service: N concurrent clients for T seconds.

    python bench/serve_load.py                              # starts configs/serve.yaml locally, tiny-flux
    python bench/serve_load.py --clients 16 --duration 30
    python bench/serve_load.py --url http://host:8000 --key igk_...   # an already running service

Measures, in this order (so they do not compete for the CPU):

1. the ``Renderer`` called directly in this process (one image per call, batch 1, the same
   request and the same torch thread count as a renderer replica): the floor;
2. the service at concurrency 1: the same request through HTTP, auth, the ingress, the renderer
   deployment, provenance and audit; *per-request overhead* = its median minus the direct median;
3. the service under load: ``--clients`` threads each sending sync renders back to back for
   ``--duration`` seconds: throughput, latency p50/p95/p99, errors by status and code, and the
   mean pipeline batch size (from ``/metrics``).

For a service it starts itself, the concurrency-1 phase also reads every process's CPU time from
``/proc`` before and after, and reports **CPU ms per request** by part (renderer replica,
ingress, Ray's HTTP proxy, Ray's control plane, this load generator): where the overhead goes.

Prints a table and, last, one JSON document (also written to ``--json`` when given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections import Counter
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


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


#: process command-line marker -> the part of the service it is (first match wins)
PARTS = (
    ("ServeReplica:imagegen:renderer", "renderer replica"),
    ("ServeReplica:imagegen:Ingress", "ingress replica"),
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


def direct_baseline(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from imagegen.pipelines.renderer import Renderer
    from imagegen.pipelines.types import RenderRequest

    torch.set_num_threads(args.replica_threads)
    renderer = Renderer(args.preset)
    request = RenderRequest(**{k: v for k, v in body(args, 0).items() if k != "preset"})
    renderer.render([request])
    times = []
    for _ in range(args.direct_repeats):
        started = time.perf_counter()
        renderer.render([request])
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "p95_s": percentile(times, 95), "calls": len(times)}


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
                    time.sleep(float(response.headers.get("retry-after", "1")) if status else 1.0)

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
    parser.add_argument("--replica-threads", type=int, default=1, help="torch threads of the direct baseline")
    parser.add_argument("--direct-repeats", type=int, default=20)
    parser.add_argument("--single-duration", type=float, default=8.0, help="seconds at concurrency 1")
    parser.add_argument("--json", help="also write the JSON document here")
    args = parser.parse_args()

    console.print(f"direct Renderer baseline ({args.preset}, {args.size}px, {args.steps} steps) ...")
    direct = direct_baseline(args)

    service = None
    url, key = args.url, args.key
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
        if renderer_config:
            overrides["renderer_config"] = renderer_config
        service = start_service(log_to_driver=False, **overrides)
        url = service.url
        with ServeStore.open() as store:
            key = create_key(store, "bench-serve-load", ["admin"])[1]
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
            for i in range(3):  # warm-up: prompt cache, connections
                client.post("/v1/renders", json=body(args, i)).raise_for_status()
            console.print("concurrency 1 ...")
            cpu_before = cpu_seconds_by_process() if service is not None else None
            single = run_clients(url, key, args, 1, args.single_duration)
            if cpu_before is not None:
                single["cpu_ms_per_request"] = cpu_split(cpu_before, cpu_seconds_by_process(), single["requests"])
            before = batch_figures(client, args.preset)
            console.print(f"{args.clients} clients for {args.duration:.0f}s ...")
            loaded = run_clients(url, key, args, args.clients, args.duration)
            after = batch_figures(client, args.preset)
            health = client.get("/readyz").json()
    finally:
        if service is not None:
            service.stop()
    batches = after[1] - before[1]
    loaded["mean_batch_size"] = round((after[0] - before[0]) / batches, 3) if batches else None
    overhead = single["latency_s"]["p50"] - direct["median_s"] if single["latency_s"]["p50"] else None
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "request": {"preset": args.preset, "size": args.size, "steps": args.steps},
        "renderer": health.get("checks", {}).get("renderers", {}).get(args.preset),
        "direct_renderer": direct,
        "concurrency_1": single,
        "loaded": loaded,
        "per_request_overhead_s": round(overhead, 4) if overhead is not None else None,
    }
    table = Table(title=f"serve load: {args.preset} {args.size}px {args.steps} steps")
    for column in ("run", "clients", "ok", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch"):
        table.add_column(column)

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    table.add_row(
        "direct Renderer",
        "1",
        str(direct["calls"]),
        f"{1 / direct['median_s']:.2f}",
        ms(direct["median_s"]),
        ms(direct["p95_s"]),
        "-",
        "0",
        "1",
    )
    for label, run in (("HTTP, concurrency 1", single), (f"HTTP, {args.clients} clients", loaded)):
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
    print(f"per-request overhead (HTTP p50 at concurrency 1 - direct median): {ms(overhead)} ms")
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


if __name__ == "__main__":
    main()
