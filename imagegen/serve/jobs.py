"""Durable jobs: the database holds every job; each ingress replica runs a ``JobRunner``.

Life of a job: ``POST /v1/jobs`` writes it ``queued``; a runner *claims* it (``running``, one
more attempt, owner = that runner) and dispatches it to the renderers; progress events go to the
database (the SSE stream reads them from there, so any ingress replica can serve it); the result
(PNG blobs + metadata) is stored and the job ends ``done`` — or ``failed`` with a reason, or
``cancelled``.

Nothing is lost when a process dies:

- a renderer replica dies mid-render: the runner sees the actor error and queues the job again
  (the next claim renders it on another replica, or on the restarted one) while attempts remain
  (``job_max_attempts``, 2 = retried once), else it fails with the reason;
- the ingress replica running it dies: its heartbeats stop; every runner periodically takes over
  ``running`` jobs whose heartbeat is older than ``job_stale_after_s`` (queued again, or failed
  when out of attempts). A job is never left ``running``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imagegen.errors import ImagegenError
from imagegen.serve.config import IngressConfig
from imagegen.serve.errors import ApiError
from imagegen.serve.store import Job, ServeStore

log = logging.getLogger(__name__)


class RendererDied(Exception):
    """The renderer replica serving a call died (or became unreachable) before it answered."""


#: runs one job: (job, emit progress event) -> result dict
JobExecutor = Callable[[Job, Callable[[dict[str, Any]], None]], Awaitable[dict[str, Any]]]


class JobRunner:
    """Claims queued jobs, runs them with bounded concurrency, heartbeats them, recovers stale ones."""

    def __init__(
        self,
        store: ServeStore,
        execute: JobExecutor,
        config: Callable[[], IngressConfig],
        db_pool: ThreadPoolExecutor,
        on_event: Callable[[str], None] | None = None,
    ):
        self.store = store
        self.execute = execute
        self.config = config
        self.db_pool = db_pool
        self.on_event = on_event or (lambda job_id: None)
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.tasks: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task] = []
        self._last_expire = 0.0
        self.stopping = False

    async def db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.db_pool, fn, *args)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._claim_loop()), loop.create_task(self._heartbeat_loop())]

    def wake(self) -> None:
        self._wake.set()

    async def _claim_loop(self) -> None:
        while not self.stopping:
            try:
                cfg = self.config()
                free = cfg.job_concurrency - len(self.tasks)
                if free > 0:
                    for job in await self.db(self.store.claim_jobs, self.owner, free, cfg.job_max_attempts):
                        self.on_event(job.id)
                        self.tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job))
            except Exception:  # noqa: BLE001 - the loop must survive a database hiccup
                log.exception("claiming jobs failed")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.config().job_poll_s)

    async def _heartbeat_loop(self) -> None:
        while not self.stopping:
            cfg = self.config()
            try:
                statuses = await self.db(self.store.heartbeat, self.owner, list(self.tasks))
                for job_id, status in statuses.items():
                    if status != "running" and job_id in self.tasks:
                        log.info("job %s is %s elsewhere; stopping it here", job_id, status)
                        self.tasks[job_id].cancel()
                for job_id, status in await self.db(
                    self.store.recover_stale, cfg.job_stale_after_s, cfg.job_max_attempts
                ):
                    log.warning("took over stale job %s -> %s", job_id, status)
                    self.on_event(job_id)
                    self.wake()
                if time.monotonic() - self._last_expire > 600:
                    self._last_expire = time.monotonic()
                    await self.db(self.store.expire_jobs, cfg.job_ttl_s)
            except Exception:  # noqa: BLE001
                log.exception("job heartbeat failed")
            await asyncio.sleep(cfg.job_heartbeat_s)

    def cancel_local(self, job_id: str) -> None:
        task = self.tasks.get(job_id)
        if task is not None:
            task.cancel()

    async def _run(self, job: Job) -> None:
        cfg = self.config()
        writer = _SerialWriter()

        def emit(data: dict[str, Any]) -> None:
            progress = {k: data[k] for k in ("images_done", "images_total") if k in data}

            async def write() -> None:
                await self.db(self.store.job_progress, job.id, self.owner, data, progress)
                self.on_event(job.id)

            writer.push(write)

        try:
            result = await self.execute(job, emit)
            await writer.flush()
            if not await self.db(self.store.finish_job, job.id, self.owner, result):
                log.info("job %s finished but was cancelled or taken over meanwhile; result dropped", job.id)
                # a purged (deleted character) or cancelled job must leave no PNG behind
                await self.db(self.store.discard_result, result)
        except asyncio.CancelledError:
            await writer.flush()
            if self.stopping:  # shutting down: give the job back without spending an attempt
                await self.db(self.store.release_job, job.id, self.owner)
            return
        except RendererDied as exc:
            await writer.flush()
            status = await self.db(self.store.requeue_job, job.id, self.owner, str(exc), cfg.job_max_attempts)
            log.warning("job %s: renderer died (%s) -> %s", job.id, exc, status)
            self.wake()
        except ApiError as exc:
            await writer.flush()
            await self.db(self.store.fail_job, job.id, self.owner, exc.code, exc.message)
        except ImagegenError as exc:
            await writer.flush()
            await self.db(self.store.fail_job, job.id, self.owner, exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - a job always ends with a reason
            log.exception("job %s failed", job.id)
            await writer.flush()
            await self.db(self.store.fail_job, job.id, self.owner, "internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            self.tasks.pop(job.id, None)
            self.on_event(job.id)
            self.wake()

    def shutdown(self) -> None:
        """Stop claiming; give running jobs back (queued, no attempt spent) so others take them now."""
        self.stopping = True
        for task in self._loops:
            task.cancel()
        for job_id in list(self.tasks):
            try:
                self.store.release_job(job_id, self.owner)
            except Exception:  # noqa: BLE001 - best effort; heartbeats expire anyway
                log.exception("releasing job %s failed", job_id)
        for task in list(self.tasks.values()):
            task.cancel()


class _SerialWriter:
    """Runs async writes one after the other, in order, without blocking the caller."""

    def __init__(self) -> None:
        self._tail: asyncio.Task | None = None

    def push(self, write: Callable[[], Awaitable[None]]) -> None:
        previous = self._tail

        async def run() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            try:
                await write()
            except Exception:  # noqa: BLE001 - progress is best effort
                log.exception("writing a job event failed")

        self._tail = asyncio.get_running_loop().create_task(run())

    async def flush(self) -> None:
        if self._tail is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._tail)
