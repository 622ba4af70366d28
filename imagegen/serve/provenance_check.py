"""Provenance read-back through the API: which layers of an image survived, who signed it, and — for
the tenant that rendered it only — the request that made it (``POST /v1/provenance/check``).

The same check as ``imagegen provenance check`` (``imagegen.provenance.check_image``), for platform
backends that hold a key but not the database: an image found on the web is sent back as it is
(re-encoded, resized, cropped, stripped of its metadata) and the report says what is left. The
upload's header is checked before anything is decoded (the registration's limits: bytes, pixels,
decompression bombs); the decode, the watermark search and the C2PA validation run on one thread
of their own, off the event loop; this replica's queued audit rows are written first, so an image
rendered a moment ago is found.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imagegen.identity.ingest import read_header
from imagegen.provenance import check_image
from imagegen.serve.audit import AuditWriter
from imagegen.serve.store import ServeStore
from imagegen.serve.tenancy import Caller


class ProvenanceService:
    """Checks uploaded images against this deployment's signer, watermark and audit trail."""

    def __init__(self, store: ServeStore, audit: AuditWriter):
        self.store = store
        self.audit = audit
        #: a check decodes a whole image and searches it for the watermark: one at a time per replica
        self.cpu_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="provenance")

    async def check(self, caller: Caller, data: bytes) -> dict[str, Any]:
        """The report of ``check_image`` with the audit look-up limited to ``caller``'s tenant."""
        read_header(data, "image")  # refuses what is not an image or is over a limit, before decoding
        await self.audit.flush()
        run: Callable[[], dict[str, Any]] = functools.partial(check_image, data, self.store, tenant=caller.tenant)
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, run)

    def shutdown(self) -> None:
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
