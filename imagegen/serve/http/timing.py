"""Where a request's time went, as a ``Server-Timing`` response header (W3C Server Timing).

Browsers' developer tools and any HTTP client show it; ``bench/serve_load.py`` reads it to split
imagegen's own work from Ray's hops. Every duration is measured within one process (the ingress
with its clock, the renderer replica with its own), so the figures hold across nodes.

Every request: ``auth`` (edge checks and the API key), ``body`` (receiving the body: Ray Serve pulls it
from its HTTP proxy), ``parse`` (validation and route dependencies), ``respond`` (the route's answer
serialised) and ``total`` (arrival at the ingress to the response's start). A synchronous render adds
``ingress`` (planning, gate, response objects and the audit queue: the ingress's own work),
``renderer`` (the call to the renderer deployment and back), ``hops`` (of that, what the replica did
not spend on the request: Ray's hops each way), and from the replica ``queue`` (waiting for the
renderer, batch wait included), ``render`` (prompt encode, pipeline, decode) and ``stamp``
(watermark, metadata, PNG encode, C2PA signature), of the image the response waited for longest.
"""

from __future__ import annotations

import time
from typing import Any

#: the ASGI scope key the edge middleware keeps a request's ``ServerTiming`` under
SCOPE_KEY = "imagegen.timing"


class ServerTiming:
    """Phases of one request: ``mark(name)`` closes a phase that ran since the previous mark."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self) -> float:
        """Seconds since the previous mark (or the start); moves the mark to now."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds

    def mark(self, name: str) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + self.lap()

    def add(self, name: str, seconds: float | None) -> None:
        """A phase measured elsewhere (the renderer replica), in seconds."""
        if seconds is not None:
            self.phases[name] = max(0.0, float(seconds))

    def header(self) -> str:
        phases = {**self.phases, "total": time.perf_counter() - self.started}
        return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in phases.items())


def parse_header(value: str) -> dict[str, float]:
    """A ``Server-Timing`` header's phases as {name: milliseconds} (what clients and the bench read)."""
    phases: dict[str, float] = {}
    for entry in value.split(","):
        name, _, rest = entry.strip().partition(";")
        for param in rest.split(";"):
            key, _, number = param.strip().partition("=")
            if key == "dur" and name:
                phases[name] = float(number)
    return phases


def of_scope(scope: dict[str, Any]) -> ServerTiming | None:
    return scope.get(SCOPE_KEY)


def add_render_phases(timing: ServerTiming, rendered: Any) -> None:
    """The phases of a synchronous render (``service.Rendered``) that just returned from the service:
    the time since the last mark split into the ingress's own work and the call to the renderer.

    The replica's figures are those of the image whose call to the renderer took longest.
    """
    service_s = timing.lap()
    out = rendered.out
    renderer_s = out.timings.get("render_s")
    timing.add("ingress", service_s - renderer_s if renderer_s is not None else None)
    timing.add("renderer", renderer_s)
    spans = [image.metadata.get("timings") or {} for image in out.images]
    slowest = max(spans, key=lambda t: t.get("replica_s") or 0.0, default={})
    if renderer_s is not None and slowest.get("replica_s") is not None:
        timing.add("hops", renderer_s - slowest["replica_s"])
    for phase, key in (("queue", "queue_s"), ("render", "total_s"), ("stamp", "stamp_s")):
        timing.add(phase, slowest.get(key))
