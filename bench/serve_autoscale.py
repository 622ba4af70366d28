"""Serve autoscaling under a load burst: a renderer deployment's replicas over time, 1 -> 2 -> 1.

    python bench/serve_autoscale.py                       # tiny-flux on a local Ray with 2 CPUs
    python bench/serve_autoscale.py --clients 8 --json autoscale.json

Starts configs/serve.yaml (one preset, warm-up off) with the renderer's ``autoscaling_config`` replaced
by short delays (``AUTOSCALING``: 1 to 2 replicas, target 2 ongoing requests, upscale after 1 s,
downscale after 4 s) and half a CPU per replica, so that two replicas fit on a 2-core machine. Then
``--clients`` closed-loop clients send synchronous renders until the second replica has run for
``--hold-s`` (at least ``--min-load-s``, at most ``--max-load-s``), stop, and the deployment is watched
until it is back to one replica. Prints the replica counts over time and the figures (JSON, then a
table): when Serve decided to add a replica, when the second one ran, how long after the burst it
went away, and the renders served (throughput and latency) while one and while two replicas ran.

``tests/cluster/test_autoscaling.py`` runs ``run_burst`` and asserts the behaviour (1 -> 2 -> 1);
the times are figures for docs/benchmarks.md, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

#: the renderer's autoscaling in this benchmark (and its test): short delays, so a burst of seconds shows it
AUTOSCALING: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 4.0,
    "look_back_period_s": 2.0,
    # deprecated in Ray 2.60 but still how often replicas and handles report their load (default 10 s)
    "metrics_interval_s": 0.5,
}
#: replica states that hold (or are about to hold) resources, i.e. everything but a replica on its way out
LIVE_STATES = ("STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION")


def service_overrides(preset: str = "tiny-flux", cpus_per_replica: float = 0.5, warmup: bool = False) -> dict[str, Any]:
    """``start_service`` keyword arguments: one preset (warm-up off unless asked), its renderer autoscaling as above.

    With warm-up a new replica takes traffic only once it has rendered its warm-up shapes (the shipped behaviour):
    the time to a second running replica includes it, and no request pays a cold first call."""
    return {
        "presets": [preset],
        "warmup": warmup,
        "ingress": {
            "max_renders_per_key": 32,
            "key_rate_per_s": 1000,  # the burst comes from one key: its own limits must not be what refuses it
            "key_burst": 1000,
        },
        "renderer_options": {
            preset: {"autoscaling_config": AUTOSCALING, "ray_actor_options": {"num_cpus": cpus_per_replica}}
        },
        "renderer_config": {"max_batch_size": 4},
    }


@dataclass
class Sample:
    t: float
    running: int
    live: int
    states: dict[str, int]
    status: str


class ReplicaSampler(threading.Thread):
    """Reads the deployment's replica states from Serve every ``period_s`` (``serve.status()``)."""

    def __init__(self, app: str, deployment: str, t0: float, period_s: float = 0.25):
        super().__init__(daemon=True, name="replica-sampler")
        self.app, self.deployment, self.t0, self.period_s = app, deployment, t0, period_s
        self.samples: list[Sample] = []
        self.stopped = threading.Event()

    def read(self) -> Sample:
        from ray import serve

        status = serve.status().applications[self.app].deployments[self.deployment]
        states = {str(getattr(k, "value", k)): int(v) for k, v in status.replica_states.items()}
        return Sample(
            t=round(time.monotonic() - self.t0, 3),
            running=states.get("RUNNING", 0),
            live=sum(states.get(s, 0) for s in LIVE_STATES),
            states=states,
            status=str(getattr(status.status, "value", status.status)),
        )

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.samples.append(self.read())
            except Exception:  # noqa: BLE001 - a status call during a controller hiccup: try again
                pass
            self.stopped.wait(self.period_s)

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None


@dataclass
class Call:
    start: float
    end: float
    status: int


@dataclass
class Burst:
    """Closed-loop clients, each sending one synchronous render after the other until stopped."""

    url: str
    key: str
    preset: str
    clients: int
    steps: int
    t0: float
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]

    def _client(self, index: int) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.url, timeout=300) as client:
            n = 0
            while not self.stop.is_set():
                seed = index * 1000 + n
                body = {"preset": self.preset, "prompt": f"burst {index}", "seed": seed, "steps": self.steps}
                start = time.monotonic() - self.t0
                try:
                    status = client.post("/v1/renders", json=body, headers=headers).status_code
                except httpx.HTTPError:
                    status = 0
                with self.lock:
                    self.calls.append(Call(round(start, 3), round(time.monotonic() - self.t0, 3), status))
                n += 1

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> float:
        """Stop sending; wait for the renders in flight; returns when the last one ended (seconds from t0)."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=300)
        return max((c.end for c in self.calls), default=time.monotonic() - self.t0)


def _first(samples: list[Sample], after: float, test) -> float | None:
    return next((s.t for s in samples if s.t >= after and test(s)), None)


def _phase(calls: list[Call], start: float | None, end: float | None) -> dict[str, Any]:
    """Renders that ended within [start, end]: how many, per second (throughput), their latency."""
    if start is None or end is None or end <= start:
        return {"renders": 0, "per_s": None, "p50_s": None}
    inside = [c for c in calls if c.status == 200 and start <= c.end <= end]
    latencies = sorted(c.end - c.start for c in inside)
    return {
        "renders": len(inside),
        "per_s": round(len(inside) / (end - start), 2),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
    }


def run_burst(
    url: str,
    key: str,
    *,
    preset: str = "tiny-flux",
    clients: int = 6,
    steps: int = 20,
    hold_s: float = 5.0,
    hold_renders: int = 8,
    min_load_s: float = 5.0,
    max_load_s: float = 120.0,
    settle_s: float = 90.0,
    app: str = "imagegen",
) -> dict[str, Any]:
    """Burst, then quiet, on a running service whose renderer autoscales; the timeline and its figures.

    The burst lasts until the second replica has run for ``hold_s`` and ``hold_renders`` renders have
    finished since (at least ``min_load_s``, at most ``max_load_s``); then the deployment is watched for
    ``settle_s`` at most, until it is back to one replica."""
    deployment = f"renderer-{preset}"
    t0 = time.monotonic()
    sampler = ReplicaSampler(app, deployment, t0)
    before = sampler.read()
    sampler.start()
    burst = Burst(url, key, preset, clients, steps, t0)
    burst.start()
    two_since: float | None = None
    while True:
        now = time.monotonic() - t0
        latest = sampler.latest()
        if latest is not None and latest.running >= 2 and two_since is None:
            two_since = now
        done_since = 0 if two_since is None else sum(1 for c in list(burst.calls) if c.end >= two_since)
        held = two_since is not None and now - two_since >= hold_s and done_since >= hold_renders
        if now >= max_load_s or (held and now >= min_load_s):
            break
        time.sleep(0.1)
    load_end = burst.finish()
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        latest = sampler.latest()
        if latest is not None and latest.t > load_end and latest.states == {"RUNNING": 1}:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    sampler.stopped.set()
    sampler.join(timeout=5)
    samples = sampler.samples
    decided = _first(samples, 0, lambda s: s.live >= 2)
    two = _first(samples, 0, lambda s: s.running >= 2)
    shrank = _first(samples, load_end, lambda s: s.live <= 1)
    back = _first(samples, load_end, lambda s: s.live == 1 and s.running == 1)
    gone = _first(samples, load_end, lambda s: s.states == {"RUNNING": 1})
    statuses: dict[str, int] = {}
    for call in burst.calls:
        statuses[str(call.status)] = statuses.get(str(call.status), 0) + 1
    return {
        "load_average_1m": round(os.getloadavg()[0], 2),  # the machine's load at the end (figures are noisy when high)
        "preset": preset,
        "clients": clients,
        "steps": steps,
        "autoscaling": AUTOSCALING,
        "replicas_before": before.running,
        "peak_running": max((s.running for s in samples), default=0),
        "final_running": samples[-1].running if samples else None,
        "final_live": samples[-1].live if samples else None,
        "upscale_decided_s": decided,
        "second_replica_running_s": two,
        "load_s": round(load_end, 3),
        "downscale_decided_after_load_s": None if shrank is None else round(shrank - load_end, 3),
        "back_to_one_after_load_s": None if back is None else round(back - load_end, 3),
        "second_replica_gone_after_load_s": None if gone is None else round(gone - load_end, 3),
        "statuses": statuses,
        "one_replica": _phase(burst.calls, 0.0, two),
        "two_replicas": _phase(burst.calls, two, load_end),
        "timeline": [asdict(s) for s in _changes(samples)],
    }


def _changes(samples: list[Sample]) -> list[Sample]:
    """The samples where the replica states changed (the timeline without its repeats)."""
    out: list[Sample] = []
    for sample in samples:
        if not out or (sample.states, sample.status) != (out[-1].states, out[-1].status):
            out.append(sample)
    return out


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    timeline = Table(title=f"renderer-{result['preset']} replicas over time (burst of {result['clients']} clients)")
    for column in ("t (s)", "running", "live", "states", "status"):
        timeline.add_column(column)
    for s in result["timeline"]:
        states = ", ".join(f"{k} {v}" for k, v in sorted(s["states"].items()))
        timeline.add_row(f"{s['t']:.2f}", str(s["running"]), str(s["live"]), states, s["status"])
    console.print(timeline)
    figures = Table(title="autoscaling figures")
    figures.add_column("figure")
    figures.add_column("value")
    for name in (
        "replicas_before",
        "upscale_decided_s",
        "second_replica_running_s",
        "peak_running",
        "load_s",
        "downscale_decided_after_load_s",
        "back_to_one_after_load_s",
        "second_replica_gone_after_load_s",
        "final_running",
    ):
        figures.add_row(name, str(result[name]))
    for phase in ("one_replica", "two_replicas"):
        p = result[phase]
        figures.add_row(f"{phase}: renders, per s, p50 latency (s)", f"{p['renders']}, {p['per_s']}, {p['p50_s']}")
    figures.add_row("HTTP statuses", json.dumps(result["statuses"]))
    console.print(figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-flux")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hold-s", type=float, default=5.0, help="keep the burst this long after 2 replicas ran")
    parser.add_argument("--hold-renders", type=int, default=8, help="... and until this many renders finished")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=True, help="replicas warm up before taking traffic"
    )
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)

    from imagegen.serve.auth import create_key
    from imagegen.serve.launcher import start_service
    from imagegen.serve.store import ServeStore

    service = start_service(
        port=args.port,
        num_cpus=args.num_cpus,
        log_to_driver=False,
        **service_overrides(args.preset, warmup=args.warmup),
    )
    try:
        with ServeStore.open() as store:
            key = create_key(store, "bench-serve-autoscale", ["render"])[1]
        result = run_burst(
            service.url,
            key,
            preset=args.preset,
            clients=args.clients,
            steps=args.steps,
            hold_s=args.hold_s,
            hold_renders=args.hold_renders,
        )
    finally:
        service.stop()
    result["warmup"] = args.warmup
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print_report(result)
    return 0 if result["peak_running"] >= 2 and result["final_running"] == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
