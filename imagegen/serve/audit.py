"""Write-behind audit trail: a delivered image's audit row is written after its response, not before.

The audit commit (a thread hop and a database transaction) was the largest piece of the service's
own per-request work. An ingress replica now queues the rows of each render and one task writes
them, in order, in batches; the response does not wait. What keeps that safe:

- **read your writes where it matters**: every reader in this replica that needs the rows (a
  character's recent renders, a character's purge, a job's completion) flushes first, so within
  one replica the trail is as up to date as before;
- **a purge cannot be undone by a late row**: ``ServeStore.add_audit`` redacts, in the row's own
  transaction, the rows of a character deleted since the render (its registry tombstone), and
  drops its recent-render rows — a render still in flight during a deletion (on any replica, write-
  behind or not) cannot bring the character back;
- **bounded memory, back-pressure**: past ``max_pending`` queued rows a render waits for the
  writer (the old, synchronous behaviour) instead of queueing more;
- **a failing database is retried**, never dropped: the rows stay queued, ``/readyz`` reports the
  backlog and the error, and the writer tries again every ``retry_s``; a batch refused for what a
  row holds is written row by row and only the refused row is dropped (logged, counted);
- **shutdown writes what is queued** (``close``, from the ingress's destructor);
- **the response goes first**: a batch starts ``delay_s`` after its first row, not at once: a commit
  started while the response that queued the row is still leaving the replica competes with it for
  the GIL and the CPU (Ray's router runs in another thread of the same process), and the rows of
  renders finishing close together share one commit. A flush does not wait for the delay.

What is given up: an ingress replica that dies without a graceful shutdown loses the rows queued in
its last moments (milliseconds of renders at the rate the writer keeps up). Those images still carry
their watermark and signed C2PA manifest; only the look-up from a watermark to the request fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

log = logging.getLogger(__name__)

#: errors that mean the database cannot take a write now (retried), not that a row is wrong
UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError, SATimeoutError, OSError)

Rows = Sequence[dict[str, Any]]


class AuditWriter:
    """Queues audit rows (and character-render rows) and writes them off the request's path."""

    def __init__(
        self,
        write: Callable[[Rows, Rows], None],
        run: Callable[..., Awaitable[Any]],
        *,
        max_pending: int = 5000,
        retry_s: float = 0.5,
        delay_s: float = 0.02,
    ):
        self._write = write  # ServeStore.add_audit
        self._run = run  # runs a blocking call off the event loop
        self.max_pending = max_pending
        self.retry_s = retry_s
        self.delay_s = delay_s
        #: set by a flush (or back-pressure): the writer starts now instead of after ``delay_s``
        self._hurry = asyncio.Event()
        self._audits: list[dict[str, Any]] = []
        self._renders: list[dict[str, Any]] = []
        self._task: asyncio.Task | None = None
        self._in_flight = 0
        self.error: str | None = None
        self.written = 0
        #: rows the database refused for their content (logged with the row; never silently)
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Rows queued and not yet committed (those of the batch being written included)."""
        return len(self._audits) + self._in_flight

    async def submit(self, audits: Rows, renders: Rows = ()) -> None:
        """Queue the rows of one render; waits only when the queue is full (back-pressure)."""
        if not audits and not renders:
            return
        self._audits.extend(audits)
        self._renders.extend(renders)
        self._start()
        if self.pending > self.max_pending:
            await self.flush()

    async def flush(self) -> None:
        """Return once every row queued before the call is committed."""
        self._hurry.set()
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    def status(self) -> dict[str, Any]:
        return {"pending": self.pending, "written": self.written, "dropped": self.dropped, "error": self.error}

    def close(self) -> None:
        """Write what is queued now, blocking (the replica is shutting down; its loop may be gone)."""
        audits, renders = self._take()
        if not audits and not renders:
            return
        try:
            self._write(audits, renders)
        except Exception:  # noqa: BLE001 - the last chance: say which rows are lost, do not hide it
            self.dropped += len(audits)
            log.exception("the replica stops and %d audit rows could not be written: %s", len(audits), audits)
            return
        self.written += len(audits)

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    def _take(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        audits, renders = self._audits, self._renders
        self._audits, self._renders = [], []
        return audits, renders

    async def _drain(self) -> None:
        if not self._hurry.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), self.delay_s)
        self._hurry.clear()
        while self._audits or self._renders:
            audits, renders = self._take()
            self._in_flight = len(audits)
            try:
                await self._commit(audits, renders)
            finally:
                self._in_flight = 0

    async def _commit(self, audits: list[dict[str, Any]], renders: list[dict[str, Any]]) -> None:
        """Write one batch: retried while the database is unavailable; a batch the database refuses
        for its content is written row by row, so one bad row cannot hold back every later one."""
        while True:
            try:
                await self._run(self._write, audits, renders)
            except UNAVAILABLE as exc:  # down, busy or unreachable: keep the rows, retry
                if self.error is None:
                    log.warning("audit rows not written yet (%d queued), retrying: %s", self.pending, exc)
                self.error = type(exc).__name__  # /readyz is public: the name, the log has the rest
                await asyncio.sleep(self.retry_s)
                continue
            except Exception:  # noqa: BLE001 - refused for what a row holds: find the row
                if len(audits) > 1:
                    for audit in audits:
                        await self._commit([audit], [r for r in renders if r["image_id"] == audit["image_id"]])
                    return
                self.dropped += len(audits)
                log.exception("an audit row the database refuses was dropped: %s", audits)
                return
            self.error = None
            self.written += len(audits)
            return
