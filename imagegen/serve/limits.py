"""Per-key limits of one ingress replica: request rate, renders in progress, images in the renderers, streams, jobs.

Ray Serve bounds the ingress as a whole (``max_ongoing_requests``); without limits per key, one
key holding many long requests (105 open event streams) took every slot and ``/healthz`` and the
other keys timed out. So each key gets, on top of the global limits that exist:

- a request rate: a token bucket (``key_rate_per_s`` sustained, ``key_burst`` at once); beyond it
  429 ``rate_limited`` with a ``Retry-After`` computed from the bucket (when the next token comes);
- a number of synchronous renders in progress (``max_renders_per_key``): 429 ``too_many_renders``;
- a number of images in the renderers at once (``max_images_in_flight_per_key``): a request is ``num_images``
  renderer calls, and a renderer's queue (its ``max_queued_requests``, per caller: this replica's handle) is
  shared by every key. Ten 8-image renders of one key filled it, and every other key's render met 503
  ``renderer_overloaded`` for minutes. A sync render whose images do not fit is refused up front (429
  ``too_many_images``; one whose ``num_images`` alone is above the limit, 422 naming the most it may ask for);
  a job, already accepted, waits for room (``images_when_free``); sync renders and jobs share one count;
- a number of open event streams (``max_streams_per_key``), and all keys together ``max_streams``:
  429 ``too_many_streams``;
- a number of jobs queued or running (``max_jobs_per_key``): 429 ``too_many_jobs``.

Rates, renders, images and streams are counted in memory, per ingress replica (with N replicas a key gets
up to N times as much; the proxy spreads a key's requests over them; the renderer queue an image count
protects is per ingress replica too). Jobs outlive requests and run
on any replica, so they are counted in the database, like the global ``max_queued_jobs``: the
insert of a job counts both in the same serialised step (``ServeStore.create_job`` with its caps;
``job_cap_error`` is its 429), so concurrent submissions through any number of replicas never get
past them. Limits are looked up per request (``IngressConfig.limits_for``), so a reloaded config
applies at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from imagegen.serve.config import IngressConfig
from imagegen.serve.errors import ApiError, too_busy
from imagegen.serve.store import ACTIVE, ApiKey, JobCapReached, JobRow, ServeStore

#: a job waiting for its key's images looks again this often even when none ended (a reloaded, higher limit)
IMAGE_WAIT_RECHECK_S = 1.0


@dataclass
class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; each request takes one."""

    tokens: float
    updated: float

    def take(self, now: float, rate_per_s: float, burst: int) -> float:
        """Take a token: 0.0 when there was one, else the seconds until there will be one (none taken)."""
        self.tokens = min(float(burst), self.tokens + max(0.0, now - self.updated) * rate_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate_per_s


class StreamLease:
    """One open event stream's slot; ``release`` (idempotent) gives it back."""

    def __init__(self, limiter: KeyLimiter, key_id: str):
        self._limiter = limiter
        self.key_id = key_id
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._limiter._stream_closed(self.key_id)


class KeyLimiter:
    """The per-key counters of one ingress replica (``Ingress.limits``); ``config`` gives the current limits."""

    def __init__(
        self,
        config: Callable[[], IngressConfig],
        clock: Callable[[], float] = time.monotonic,
        on_refused: Callable[[str], None] | None = None,
    ):
        self.config = config
        self.clock = clock
        #: told the code of every refusal (the ingress counts them in ``imagegen_rejected{reason}``)
        self.on_refused = on_refused or (lambda code: None)
        self.buckets: dict[str, TokenBucket] = {}
        self.renders: dict[str, int] = {}
        #: images of each key in the renderers (sync renders and jobs of this replica)
        self.images: dict[str, int] = {}
        #: set (and replaced by a fresh one) whenever images are given back: the jobs waiting for room look again
        self._images_freed = asyncio.Event()
        self.streams: dict[str, int] = {}

    @property
    def streams_open(self) -> int:
        return sum(self.streams.values())

    # -- rate ---------------------------------------------------------------------------------
    def admit(self, key: ApiKey) -> None:
        """Count one request of ``key``; 429 ``rate_limited`` (Retry-After: when a token is back) beyond its rate."""
        limits = self.config().limits_for(key.name)
        now = self.clock()
        bucket = self.buckets.get(key.id)
        if bucket is None:
            bucket = self.buckets[key.id] = TokenBucket(tokens=float(limits.burst), updated=now)
        wait = bucket.take(now, limits.rate_per_s, limits.burst)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise self._refused(
                ApiError(
                    429,
                    "rate_limited",
                    f"this key sent more than {limits.burst} requests at once or {limits.rate_per_s:g} per second "
                    f"sustained; retry in {retry} s",
                    None,
                    {"Retry-After": str(retry)},
                )
            )

    # -- renders ------------------------------------------------------------------------------
    @contextmanager
    def render_slot(self, key: ApiKey) -> Iterator[None]:
        """Hold one of ``key``'s synchronous-render slots for the block; 429 ``too_many_renders`` when none is free."""
        cfg = self.config()
        limit = cfg.limits_for(key.name).renders
        held = self.renders.get(key.id, 0)
        if held >= limit:
            raise self._refused(
                too_busy(
                    "too_many_renders",
                    f"this key has {held} renders in progress on this replica (limit {limit}); retry when one ends",
                    cfg.retry_after_s,
                )
            )
        self.renders[key.id] = held + 1
        try:
            yield
        finally:
            left = self.renders[key.id] - 1
            if left:
                self.renders[key.id] = left
            else:
                del self.renders[key.id]

    # -- images in the renderers --------------------------------------------------------------
    def check_num_images(self, key: ApiKey, count: int) -> None:
        """422 when one request of ``key`` asks for more images than the key may have in the renderers at once."""
        limit = self.config().limits_for(key.name).images
        if count > limit:
            raise ApiError(
                422,
                "invalid_request",
                f"num_images is {count}, but this key may have at most {limit} images rendering at once: "
                f"ask for at most {limit}",
                "num_images",
            )

    @contextmanager
    def image_slots(self, key: ApiKey, count: int) -> Iterator[None]:
        """Hold ``count`` of ``key``'s images in the renderers for the block (a sync render).

        429 ``too_many_images`` when they do not fit beside the key's images in flight, 422 when ``count`` alone is
        above the limit; a refused request holds nothing.
        """
        self.check_num_images(key, count)
        cfg = self.config()
        limit = cfg.limits_for(key.name).images
        held = self.images.get(key.id, 0)
        if held + count > limit:
            raise self._refused(
                too_busy(
                    "too_many_images",
                    f"this key has {held} images rendering or queued on this replica (limit {limit}); "
                    f"{count} more do not fit; retry when some finish",
                    cfg.retry_after_s,
                )
            )
        self._take_images(key.id, count)
        try:
            yield
        finally:
            self._give_images(key.id, count)

    @asynccontextmanager
    async def images_when_free(self, key: ApiKey, count: int) -> AsyncIterator[None]:
        """Hold ``count`` of ``key``'s images for the block once they fit, waiting for room until then (a job: it
        was accepted, so it waits rather than fails). A count above the key's limit (a job stored before the limit
        was lowered, a design's candidates) waits for, and holds, the whole limit."""
        while True:
            limit = self.config().limits_for(key.name).images
            take = min(count, limit)
            if self.images.get(key.id, 0) + take <= limit:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._images_freed.wait(), IMAGE_WAIT_RECHECK_S)
        self._take_images(key.id, take)
        try:
            yield
        finally:
            self._give_images(key.id, take)

    def _take_images(self, key_id: str, count: int) -> None:
        self.images[key_id] = self.images.get(key_id, 0) + count

    def _give_images(self, key_id: str, count: int) -> None:
        left = self.images.get(key_id, 0) - count
        if left > 0:
            self.images[key_id] = left
        else:
            self.images.pop(key_id, None)
        freed, self._images_freed = self._images_freed, asyncio.Event()
        freed.set()

    # -- event streams ------------------------------------------------------------------------
    def open_stream(self, key: ApiKey) -> StreamLease:
        """A slot for one event stream of ``key``; 429 ``too_many_streams`` past the key's cap or the total."""
        cfg = self.config()
        limit = cfg.limits_for(key.name).streams
        held = self.streams.get(key.id, 0)
        if held >= limit:
            raise self._refused(
                too_busy(
                    "too_many_streams",
                    f"this key has {held} event streams open on this replica (limit {limit}); close one, "
                    "or poll GET /v1/jobs/{id}",
                    cfg.retry_after_s,
                )
            )
        total = self.streams_open
        if total >= cfg.max_streams:
            raise self._refused(
                too_busy(
                    "too_many_streams",
                    f"{total} event streams are open on this replica (limit {cfg.max_streams}); "
                    "retry later or poll GET /v1/jobs/{id}",
                    cfg.retry_after_s,
                )
            )
        self.streams[key.id] = held + 1
        return StreamLease(self, key.id)

    def _stream_closed(self, key_id: str) -> None:
        left = self.streams.get(key_id, 0) - 1
        if left > 0:
            self.streams[key_id] = left
        else:
            self.streams.pop(key_id, None)

    # -- jobs ---------------------------------------------------------------------------------
    def job_cap(self, key: ApiKey) -> int:
        """How many jobs ``key`` may have queued or running (``max_jobs_per_key``, or its override)."""
        return self.config().limits_for(key.name).jobs

    def check_jobs(self, key: ApiKey, active: int) -> None:
        """429 ``too_many_jobs`` when ``key`` already has ``active`` jobs queued or running at its limit.

        An early answer only: the job's insert checks the cap again, atomically (``ServeStore.create_job``).
        """
        limit = self.job_cap(key)
        if active >= limit:
            raise self._refused(job_cap_error(JobCapReached("key", active, limit), self.config().retry_after_s))

    def _refused(self, error: ApiError) -> ApiError:
        self.on_refused(error.code)
        return error


def job_cap_error(refused: JobCapReached, retry_after_s: int) -> ApiError:
    """The 429 of a job refused at a cap: ``too_many_jobs`` (the key's) or ``job_queue_full`` (everyone's)."""
    if refused.scope == "key":
        return too_busy(
            "too_many_jobs",
            f"this key has {refused.active} jobs queued or running (limit {refused.limit}); retry when one ends",
            retry_after_s,
        )
    return too_busy("job_queue_full", f"{refused.limit} jobs are queued or running; retry later", retry_after_s)


def counted_job_cap_error(refused: JobCapReached, retry_after_s: int, metrics: Any) -> ApiError:
    """:func:`job_cap_error`, counted in ``imagegen_rejected{reason}`` (``metrics``: the service's ``Metrics``)."""
    error = job_cap_error(refused, retry_after_s)
    metrics.rejected.labels(error.code).inc()
    return error


def count_active_jobs_of(store: ServeStore, key_id: str) -> int:
    """Jobs of ``key_id`` queued or running, on every replica (blocking: run it with ``service.db``)."""
    query = select(func.count()).where(JobRow.key_id == key_id, JobRow.status.in_(ACTIVE))
    with Session(store.engine) as session:
        return int(session.execute(query).scalar_one())
