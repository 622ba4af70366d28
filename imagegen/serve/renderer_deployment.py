"""The renderer deployment: one Serve replica hosting one ``RendererActor`` (one preset).

Callers (the render service) stream from ``render``: one ``RenderCall`` in, events out:
``StepProgress`` (when asked for), then exactly one ``RenderedImage`` or ``RenderError``.

Batching (:class:`AdaptiveBatcher`, settings in the deployment's ``user_config``, see
``RendererConfig``): calls wait in the replica's own queue and one consumer loop hands them to
``RendererActor.render_isolated`` in batches of up to ``max_batch_size``. Requests of *different*
characters share a pipeline call when their shapes match, and one bad request fails only itself.
Why not ``@serve.batch``: it holds *every* batch open for ``batch_wait_timeout_s`` after its first
request unless the batch fills, so a request at low load always paid the full wait (50 ms of a
~70 ms floor, measured). Here a request that reaches an idle replica with nothing expected renders
at once; requests that arrive while a batch renders form the next batch; and the replica holds a
batch open, at most ``batch_wait_timeout_s`` after the renderer became free, only when it has
evidence that more requests are coming (:class:`BatchPolicy`). Each image says how long its
request queued (``timings.queue_s``) and how long its batch was held open (``timings.batch_wait_s``,
exactly 0 when it was not held).

The pipeline runs in a worker thread, so the replica keeps answering health checks while it
renders.

Finishing behind the next batch: every image is scored, watermarked, encoded and signed in its
replica (``RendererActor.finish_all``), 55-70 CPU ms per 1024 px image. When another batch is queued
as a pipeline call ends, that work goes to a finishing thread and the renderer takes the next batch
at once, so the accelerator does not wait for the CPU (``RendererConfig.overlap_finishing``). At most
one batch finishes behind the renderer; a lone request is finished in the pipeline thread (no hop).
The stamp's costly parts (zlib, OpenCV, numpy) release the GIL, and its C2PA signature holds it
for ~1 ms.

Cancellation: when a caller goes away (its HTTP client disconnected, its job was deleted, or it
cancelled the handle call), Serve cancels this replica's ``render`` for it: ``CancelledError`` is
raised inside the generator. The call's ``threading.Event`` is set and the call leaves the queue:
one cancelled while queued never renders; one already in a batch is dropped by the pipeline thread
between denoising steps (``RendererActor.render_isolated``), a pipeline call whose requests are
all gone stops, and the replica takes the next batch.

Warm-up: the replica renders its configured shapes once (``imagegen.pipelines.warmup``) in
``reconfigure``, which Serve runs before the replica takes traffic, and ``check_health`` fails
while a warm-up that was asked for has not completed, so a replica is ready only when warm. A later
``user_config`` with new sizes warms only the new shapes, while the replica keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from imagegen.serve.actors import RenderCall, RenderedImage, RendererActor, RenderError
from imagegen.serve.config import RendererConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepProgress:
    """Denoising progress of the pipeline call a request is in."""

    done: int
    total: int


#: what ``RendererDeployment.render`` streams to its caller
RenderEvent = StepProgress | RenderedImage | RenderError


@dataclass(eq=False)
class _Pending:
    """One call inside this replica: its cancellation flag, its own event queue, when it arrived."""

    call: RenderCall
    arrived: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    #: its image or error was delivered
    finished: bool = False


class BatchPolicy:
    """How many requests the next batch waits for: the adaptive rule, kept apart from the queue so it reads plainly.

    Evidence of load is the previous batch: when it ended, the requests already queued will be in
    the next batch, and its callers that have nothing queued (the request id of each call tells)
    are likely to send again soon: closed-loop clients send their next request on receiving a
    result, a gated image sends its next attempt. So ``expected = backlog + returning`` callers.
    That expectation holds for ``adaptive_window_s`` after the batch ended; a request arriving later
    (a quiet service) expects nobody and renders at once, as does a lone caller whose previous
    request was alone. A multi-image request whose siblings are still queued does not count itself
    as returning, so its second batch does not wait for a caller that is busy waiting for it.
    """

    def __init__(self) -> None:
        #: calls expected in the next batch, as estimated when the previous batch ended
        self.expected = 1
        self.ended_at = -math.inf

    def target(self, queued: int, now: float, config: RendererConfig) -> int:
        """Requests the batch about to form waits for (never above ``max_batch_size``)."""
        full = config.max_batch_size
        if not config.adaptive_batch_wait:
            return full
        expected = self.expected if now - self.ended_at <= config.adaptive_window_s else 1
        return min(full, max(queued, expected))

    def batch_ended(self, batch: list[RenderCall], backlog: list[RenderCall], now: float) -> None:
        """Record the evidence a finished batch leaves: the backlog, and its callers that will come back."""
        waiting = {call.request_id for call in backlog}
        returning = sum(1 for call in batch if call.request_id not in waiting)
        self.expected = max(1, len(backlog) + returning)
        self.ended_at = now


class AdaptiveBatcher:
    """The replica's queue of calls and the one consumer loop that renders them in batches.

    ``run_batch(batch, timings, info)`` renders a list of pending calls in the pipeline thread and
    delivers each call's events (see :meth:`deliver`). It returns when the renderer is free for the
    next batch, with ``(answered, finishing)``: the ``time.monotonic()`` at which it delivered the
    batch's first outcome (None when none was yet; no caller of the batch can be back before that),
    and None, or an awaitable that completes once the batch's images still being stamped are
    delivered. It is awaited, so one batch renders while the next one forms, and the next batch
    renders while the previous one's images are stamped.
    ``config()`` is read at every batch, so a reconfigure applies to the next one. Times are
    ``time.monotonic()`` throughout (the pipeline thread reads the same clock).
    """

    def __init__(self, run_batch: Callable[..., Any], config: Callable[[], RendererConfig]):
        self.run_batch = run_batch
        self.config = config
        self.policy = BatchPolicy()
        self.queue: deque[_Pending] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        #: one task per batch whose images are still being stamped (it delivers what never came as errors)
        self._settling: set[asyncio.Task] = set()
        #: counters for health checks: batches formed, batches held open, calls dropped while queued
        self.batches = 0
        self.held_batches = 0
        self.dropped_queued = 0
        self.last_batch: dict[str, Any] | None = None

    def submit(self, call: RenderCall) -> _Pending:
        """Queue ``call``; its events arrive on the returned pending's ``events`` queue."""
        loop = asyncio.get_running_loop()
        pending = _Pending(call, arrived=time.monotonic())
        self.queue.append(pending)
        if self._arrived is None:
            self._arrived = asyncio.Event()
        self._arrived.set()
        if self._task is None or self._task.done():
            if self._task is not None and not self._task.cancelled() and self._task.exception() is not None:
                log.error("the batch loop had stopped (%r); restarting it", self._task.exception())
            self._task = loop.create_task(self._consume(), name="renderer-batches")
        return pending

    def discard(self, pending: _Pending) -> None:
        """A cancelled call leaves the queue (if it is still there): it never renders."""
        pending.cancelled.set()
        try:
            self.queue.remove(pending)
        except ValueError:
            return
        self.dropped_queued += 1

    @staticmethod
    def deliver(pending: _Pending, event: RenderEvent) -> None:
        """Hand one event to its caller (on the replica's event loop)."""
        if pending.finished:
            return
        if not isinstance(event, StepProgress):
            pending.finished = True
        pending.events.put_nowait(event)

    def _drop_cancelled(self) -> None:
        for pending in [p for p in self.queue if p.cancelled.is_set()]:
            self.discard(pending)

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        assert self._arrived is not None
        self._arrived.clear()
        try:
            if timeout is None:
                await self._arrived.wait()
            else:
                await asyncio.wait_for(self._arrived.wait(), max(0.0, timeout))
        except TimeoutError:
            return False
        return True

    async def _consume(self) -> None:
        while True:
            while not self.queue:
                await self._wait_for_arrival(None)
            # calls Ray delivered together are queued by the time this task runs again: not a wait
            await asyncio.sleep(0)
            batch, held, target = await self._gather()
            if not batch:
                continue
            started = time.monotonic()
            timings = [{"queue_s": round(started - p.arrived, 6), "batch_wait_s": round(held, 6)} for p in batch]
            info = {"held_s": round(held, 6), "target": target, "adaptive": self.config().adaptive_batch_wait}
            self.batches += 1
            self.held_batches += held > 0
            self.last_batch = {"size": len(batch), **info}
            answered, finishing = None, None
            try:
                answered, finishing = await self.run_batch(batch, timings, info)
            except Exception as exc:  # noqa: BLE001 - every caller still waiting gets the error; the loop goes on
                self._fail(batch, "render batch failed", exc)
            # the backlog is what was queued before the batch answered its first caller: a caller that
            # got its result and came back before this line runs is a returning caller, not backlog (when the
            # batch's images are still being stamped, nobody can have come back yet)
            now = time.monotonic()
            backlog = [p.call for p in self.queue if p.arrived < (answered if answered is not None else now)]
            self.policy.batch_ended([p.call for p in batch], backlog, now)
            if finishing is None:
                self._settle(batch)
            else:  # the renderer takes the next batch while this one's images are stamped
                task = asyncio.get_running_loop().create_task(self._settle_after(finishing, batch))
                self._settling.add(task)
                task.add_done_callback(self._settling.discard)

    def _fail(self, batch: list[_Pending], what: str, exc: Exception) -> None:
        """Every caller of ``batch`` still waiting gets ``exc`` as its error."""
        log.error("%s: %r", what, exc)
        error = RenderError.from_exception(exc)
        for pending in batch:
            self.deliver(pending, error)

    def _settle(self, batch: list[_Pending]) -> None:
        """A result that never came is an error, never a hang."""
        for pending in batch:
            self.deliver(pending, RenderError("render_failed", "the renderer ended the batch without a result"))

    async def _settle_after(self, finishing: Awaitable[Any], batch: list[_Pending]) -> None:
        try:
            await finishing
        except Exception as exc:  # noqa: BLE001 - the callers still waiting get the error
            self._fail(batch, "finishing a batch failed", exc)
        self._settle(batch)

    async def _gather(self) -> tuple[list[_Pending], float, int]:
        """The next batch: (pending calls, seconds it was held open, how many it waited for)."""
        config = self.config()
        self._drop_cancelled()
        if not self.queue:
            return [], 0.0, 0
        now = time.monotonic()
        target = self.policy.target(len(self.queue), now, config)
        # adaptive: the bound counts from now (the renderer just became free), so requests that queued
        # behind a long batch are not sent off before the callers of that batch can come back;
        # fixed: from the first request's arrival, as @serve.batch does
        deadline = now + config.batch_wait_timeout_s
        if not config.adaptive_batch_wait:
            deadline = self.queue[0].arrived + config.batch_wait_timeout_s
        held = 0.0
        while len(self.queue) < target and time.monotonic() < deadline:
            await self._wait_for_arrival(deadline - time.monotonic())
            self._drop_cancelled()
            held = time.monotonic() - now
            if not self.queue:
                return [], held, target
        count = min(len(self.queue), config.max_batch_size)
        return [self.queue.popleft() for _ in range(count)], held, target

    async def close(self) -> None:
        """Stop the consumer loop (calls still queued are dropped with their callers)."""
        for task in list(self._settling):
            task.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._task = None

    def health(self) -> dict[str, Any]:
        return {
            "queued": len(self.queue),
            "batches": self.batches,
            "held_batches": self.held_batches,
            "dropped_while_queued": self.dropped_queued,
            "batches_finishing": len(self._settling),
            "expected_next": self.policy.expected,
            "last_batch": self.last_batch,
        }


@serve.deployment(max_ongoing_requests=16)
class RendererDeployment:
    """Serve replica of one preset: warm-up, the adaptive batcher, and the pipeline thread of ``RendererActor``."""

    def __init__(self, preset: str, warmup: bool = True, device: str | None = None, profile: str | None = None):
        self.actor = RendererActor(preset, warmup=False, device=device, profile=profile)
        self.preset = preset
        self.config = RendererConfig()
        #: warm up before taking traffic (``AppArgs.warmup``; False only for development)
        self.warmup_enabled = warmup
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"render-{preset}")
        #: stamps a batch's images while the next batch renders (``RendererConfig.overlap_finishing``)
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"finish-{preset}")
        #: the jobs of the last batch handed to the finishing thread (read and written in the pipeline thread)
        self._finishing: list[Future] = []
        #: batches whose images were stamped while the next batch rendered
        self.finished_behind = 0
        self.batcher = AdaptiveBatcher(self._render_batch, lambda: self.config)
        #: (width, height, batch) shapes warmed so far, and every warm-up's report
        self._warmed: set[tuple[int, int, int]] = set()
        self.warmups: list[dict[str, Any]] = []
        self.warmup_seconds = 0.0
        self._warming = False
        self._warm_error: str | None = None

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply a ``user_config``: batching from the next batch on; new warm-up shapes rendered before returning."""
        self.config = RendererConfig.model_validate(user_config or {})
        if self.warmup_enabled:
            await self._warm_up(self.config)

    @property
    def warm(self) -> bool:
        return bool(self.warmups) and self._warm_error is None

    async def _warm_up(self, config: RendererConfig) -> None:
        """Render the shapes of ``config`` not warmed yet (and load identity methods the first time)."""
        preset = self.actor.renderer.preset
        sizes = config.warmup_sizes or [(preset.defaults.width, preset.defaults.height)]
        batches = config.warmup_batches()
        missing = [(w, h) for w, h in sizes if any((w, h, b) not in self._warmed for b in batches)]
        if not missing and self.warmups:
            return
        first = not self.warmups
        self._warming = True
        try:
            report = await asyncio.get_running_loop().run_in_executor(
                self._executor,
                lambda: self.actor.warm(
                    missing or sizes,
                    batches,
                    steps=config.warmup_steps,
                    identity=first and config.warmup_identity,
                    largest_batch=config.max_batch_size,
                ),
            )
        except Exception as exc:
            self._warm_error = f"{type(exc).__name__}: {exc}"
            log.error("warm-up of %s failed: %s", self.preset, self._warm_error)
            raise
        finally:
            self._warming = False
        self._warm_error = None
        self._warmed.update(report.shapes)
        self.warmups.append(report.summary())
        self.warmup_seconds += report.seconds

    def health(self) -> dict[str, Any]:
        return {
            **self.actor.health(),
            **self.config.model_dump(),
            "warm": self.warm,
            "warmup_enabled": self.warmup_enabled,
            "warming": self._warming,
            "warmup_s": round(self.warmup_seconds, 3),
            "warmups": self.warmups,
            "warmup_error": self._warm_error,
            "ready": self.warm or not self.warmup_enabled,
            "batching": {**self.batcher.health(), "finished_behind_next": self.finished_behind},
        }

    async def check_health(self) -> None:
        """Serve's health check: the replica is ready only when warm (its first check warms it up when no
        ``user_config`` did); a periodic check during a later warm-up passes (the old shapes are warm)."""
        if self._warm_error is not None:
            raise RuntimeError(f"renderer {self.preset} failed its warm-up: {self._warm_error}")
        if self.warmup_enabled and not self.warmups and not self._warming:
            await self._warm_up(self.config)

    async def render(self, item: RenderCall) -> AsyncIterator[RenderEvent]:
        """Stream one call's events: progress (when ``item.progress``), then its image or its error.

        Cancelled (``CancelledError`` or the stream closed early): the call's flag is set and it
        leaves the queue; if it is already rendering, its render stops at the next denoising step.
        """
        arrived = time.perf_counter()
        pending = self.batcher.submit(item)
        finished = False
        try:
            while True:
                event = await pending.events.get()
                yield _spanned(event, arrived)
                if not isinstance(event, StepProgress):
                    finished = True
                    return
        finally:
            if not finished:
                self.batcher.discard(pending)
                log.info("render %s cancelled by its caller", item.request_id)

    async def render_once(self, item: RenderCall) -> RenderedImage | RenderError:
        """One call's image or error, for a caller that wants no progress: a unary handle call, which costs
        the ingress less than a stream. Cancelled like ``render`` (the flag is set, the call leaves the queue)."""
        arrived = time.perf_counter()
        pending = self.batcher.submit(item)
        try:
            while True:
                event = await pending.events.get()
                if not isinstance(event, StepProgress):
                    return _spanned(event, arrived)
        except BaseException:
            self.batcher.discard(pending)
            log.info("render %s cancelled by its caller", item.request_id)
            raise

    async def _render_batch(
        self, batch: list[_Pending], timings: list[dict[str, float]], info: dict
    ) -> tuple[float | None, Awaitable[Any] | None]:
        """Render ``batch`` in the pipeline thread; each call's events go to its own queue as they happen.

        Returns when the renderer is free (see ``AdaptiveBatcher``): the ``time.monotonic()`` of the first
        outcome handed over (None if none yet), and what completes when the images handed to the finishing
        thread (:meth:`_finish`) are delivered (None when every image was finished in the pipeline thread)."""
        loop = asyncio.get_running_loop()
        deliver = self.batcher.deliver
        answered: list[float] = []
        handed: list[Future] = []

        def progress(indices: list[int], done: int, total: int) -> None:
            for i in indices:
                pending = batch[i]
                if pending.call.progress and not pending.cancelled.is_set():
                    loop.call_soon_threadsafe(deliver, pending, StepProgress(done, total))

        def on_result(index: int, outcome: RenderedImage | RenderError) -> None:
            if not answered:
                answered.append(time.monotonic())
            loop.call_soon_threadsafe(deliver, batch[index], outcome)

        def work() -> float | None:
            self.actor.render_isolated(
                [p.call for p in batch],
                progress,
                on_result,
                [p.cancelled.is_set for p in batch],
                timings=timings,
                batch_info={"wait": info},
                finish=lambda job: self._finish(job, handed),
            )
            return answered[0] if answered else None

        first = await loop.run_in_executor(self._executor, work)
        if not handed:
            return first, None
        self.finished_behind += 1
        return first, asyncio.gather(*(asyncio.wrap_future(f) for f in handed))

    def _finish(self, job: Callable[[], None], handed: list[Future]) -> None:
        """Run one pipeline call's finishing (in the pipeline thread): hand it to the finishing thread when a batch
        waits for the renderer and ``overlap_finishing`` is on, so that batch renders while these images are
        stamped (a thread hop a lone request does not pay); else at once.

        At most one batch finishes behind the renderer: its jobs are waited for before the next batch's are
        handed over, so the stamps never pile up behind a renderer that is faster than them."""
        if not (self.config.overlap_finishing and self.batcher.queue):
            job()
            return
        if not handed:
            wait(self._finishing)
            self._finishing = handed
        handed.append(self._finisher.submit(job))


def _spanned(event: RenderEvent, arrived: float) -> RenderEvent:
    """``event`` with, when it is the image, ``timings.replica_s``: how long the call spent in this replica
    (queue, render, stamp, hand-over), so the ingress can tell Ray's hops from the replica's time."""
    if isinstance(event, RenderedImage):
        span = round(time.perf_counter() - arrived, 6)
        event.timings["replica_s"] = span
        shown = event.metadata.get("timings")  # the response's copy (the PNG keeps what it was signed with)
        if isinstance(shown, dict):
            shown["replica_s"] = span
    return event
