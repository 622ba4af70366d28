"""Prometheus metrics of an ingress replica, exposed at ``/metrics`` (text format).

Batch figures come from the renderers: every rendered image carries the id, size and number of
distinct characters of the pipeline batch it came from; the ingress counts each batch once.
"""

from __future__ import annotations

from collections import OrderedDict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# the *_created samples double the output and no dashboard uses them
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "imagegen_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "imagegen_http_request_duration_seconds",
            "HTTP request latency (to the end of the response).",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "imagegen_batch_size",
            "Requests per renderer pipeline batch.",
            ["preset"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_characters = Histogram(
            "imagegen_batch_characters",
            "Distinct characters per renderer pipeline batch.",
            ["preset"],
            buckets=(0, 1, 2, 3, 4, 6, 8, 16),
            registry=r,
        )
        self.mixed_batches = Counter(
            "imagegen_mixed_character_batches",
            "Pipeline batches holding more than one character.",
            ["preset"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "imagegen_queue_depth",
            "Render calls this ingress is waiting on (sent or queued at the handle).",
            ["preset"],
            registry=r,
        )
        self.inflight = Gauge("imagegen_inflight_renders", "Synchronous renders in progress.", registry=r)
        self.audit_pending = Gauge(
            "imagegen_audit_pending", "Audit rows of delivered images not yet written (write-behind).", registry=r
        )
        self.jobs = Gauge("imagegen_jobs", "Jobs in the database by status.", ["status"], registry=r)
        self.images = Counter("imagegen_images_rendered", "Images rendered and returned.", ["preset"], registry=r)
        self.gate_retries = Counter(
            "imagegen_gate_retries",
            "Consistency-gate re-renders (an image below the similarity bar).",
            ["preset"],
            registry=r,
        )
        self.gate_failures = Counter(
            "imagegen_gate_failures", "Images that never reached the similarity bar.", ["preset"], registry=r
        )
        self.rejected = Counter("imagegen_rejected", "Requests refused for capacity (429/503).", ["reason"], registry=r)
        self.renderer_retries = Counter(
            "imagegen_renderer_retries",
            "Render calls retried because a renderer replica died.",
            ["preset"],
            registry=r,
        )
        self.renders_cancelled = Counter(
            "imagegen_renders_cancelled",
            "Render calls cancelled by their caller (client gone, job deleted); the renderer drops them between steps.",
            ["preset"],
            registry=r,
        )
        self._seen_batches: OrderedDict[str, None] = OrderedDict()

    def observe_batch(self, preset: str, batch: dict) -> None:
        """Count a pipeline batch once, however many of its images pass through this ingress."""
        batch_id = batch.get("id")
        if not batch_id or batch_id in self._seen_batches:
            return
        self._seen_batches[batch_id] = None
        while len(self._seen_batches) > 4096:
            self._seen_batches.popitem(last=False)
        self.batch_size.labels(preset).observe(batch.get("size", 1))
        characters = batch.get("characters", 0)
        self.batch_characters.labels(preset).observe(characters)
        if characters > 1:
            self.mixed_batches.labels(preset).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
