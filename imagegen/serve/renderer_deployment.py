"""The renderer deployment: one Serve replica hosting one ``RendererActor`` (one preset).

Callers (the render service) stream from ``render``: one ``RenderCall`` in, events out:
``StepProgress`` (when asked for), then exactly one ``RenderedImage`` or ``RenderError``.
``@serve.batch`` gathers the requests that arrive within ``batch_wait_timeout_s`` (up to
``max_batch_size``, both from the deployment's ``user_config``) into one
``RendererActor.render_isolated`` call: requests of *different* characters share a pipeline
call when their shapes match, and one bad request fails only itself.

The pipeline runs in a worker thread, so the replica keeps answering health checks while it
renders.

Cancellation: when a caller goes away (its HTTP client disconnected, its job was deleted, or it
cancelled the handle call), Serve cancels this replica's ``render`` for it: ``CancelledError`` is
raised inside the generator. ``@serve.batch`` drops a cancelled request only while it still
waits for a batch; once the batch runs it would render it to the end. So every call carries a
``threading.Event`` that ``render`` sets when it is cancelled, and the pipeline thread reads it
between denoising steps (``RendererActor.render_isolated``): the request leaves its pipeline
call at the next step, a call whose requests are all gone stops, and the replica takes the next
batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from imagegen.serve.actors import RenderCall, RenderedImage, RendererActor, RenderError
from imagegen.serve.config import RendererConfig

log = logging.getLogger(__name__)

_END = "end"


@dataclass(frozen=True)
class StepProgress:
    """Denoising progress of the pipeline call a request is in."""

    done: int
    total: int


#: what ``RendererDeployment.render`` streams to its caller
RenderEvent = StepProgress | RenderedImage | RenderError


@dataclass(frozen=True)
class _Pending:
    """One call inside this replica, with the flag its caller's cancellation sets."""

    call: RenderCall
    cancelled: threading.Event = field(default_factory=threading.Event)


@serve.deployment(max_ongoing_requests=16)
class RendererDeployment:
    """Serve replica of one preset; the batching front of ``RendererActor``."""

    def __init__(self, preset: str, warmup: bool = True, device: str | None = None):
        self.actor = RendererActor(preset, warmup=warmup, device=device)
        self.preset = preset
        self.config = RendererConfig()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"render-{preset}")

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        self.config = RendererConfig.model_validate(user_config or {})
        self._render_batch.set_max_batch_size(self.config.max_batch_size)
        self._render_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    def health(self) -> dict[str, Any]:
        return {**self.actor.health(), **self.config.model_dump()}

    def check_health(self) -> None:
        """Serve's periodic health check: the actor is loaded and its worker thread is alive."""
        if self.actor is None:
            raise RuntimeError("renderer not loaded")

    async def render(self, item: RenderCall) -> AsyncIterator[RenderEvent]:
        """Stream one call's events: progress (when ``item.progress``), then its image or its error.

        ``None`` items are fillers of the batch stream (another caller's event): they are dropped
        here, so a batch of B sends each caller its own few events instead of B x events messages.
        Cancelled (``CancelledError`` or the stream closed early): the call's flag is set, and its
        render stops at the next denoising step.
        """
        pending = _Pending(item)
        finished = False
        try:
            async for event in self._render_batch(pending):
                if event is not None:
                    yield event
            finished = True
        finally:
            if not finished:
                pending.cancelled.set()
                log.info("render %s cancelled by its caller", item.request_id)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _render_batch(self, pending: list[_Pending]) -> AsyncIterator[list[Any]]:
        items = [p.call for p in pending]
        count = len(items)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(message: tuple) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, message)

        def progress(indices: list[int], done: int, total: int) -> None:
            put(("progress", indices, done, total))

        def on_result(index: int, outcome: RenderedImage | RenderError) -> None:
            put(("result", [index], outcome, None))

        def work() -> None:
            try:
                self.actor.render_isolated(items, progress, on_result, [p.cancelled.is_set for p in pending])
            except BaseException as exc:  # noqa: BLE001 - reported to every caller still waiting
                put((_END, [], exc, None))
            else:
                put((_END, [], None, None))

        loop.run_in_executor(self._executor, work)
        stopped = [False] * count
        while True:
            kind, indices, payload, extra = await queue.get()
            if kind == "progress":
                wanted = [
                    i for i in indices if not stopped[i] and items[i].progress and not pending[i].cancelled.is_set()
                ]
                if wanted:
                    out: list[Any] = [None] * count
                    for i in wanted:
                        out[i] = StepProgress(payload, extra)
                    yield out
            elif kind == "result":
                index = indices[0]
                out = [None] * count
                out[index] = payload
                yield out
                out = [None] * count
                out[index] = StopIteration
                stopped[index] = True
                yield out
            else:  # the worker finished
                if payload is not None:
                    log.error("render batch failed: %r", payload)
                    error = RenderError.from_exception(payload)
                    out = [None] * count
                    for i in range(count):
                        if not stopped[i]:
                            out[i] = error
                    yield out
                yield [StopIteration] * count
                return
