"""Character registration and management for the HTTP layer, off the event loop.

Registration and approval analyse faces (CPU-heavy: a small pool of their own); reads and deletes
are database calls (the render service's pool). The workflows themselves are
``imagegen.identity.characters`` and the registry's character store; this schedules them and
applies tenancy: every call names its ``Caller``, and a character of another tenant is answered
as missing (``admin`` spans tenants).

Deleting a character removes every byte of it: the registry's rows and blobs, then every job
that rendered it (rows, events, result PNGs); its audit rows keep only the watermark tag, hashes,
times and key id (the retention policy: README, "Deleting a character").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imagegen.identity.registry import Registry
from imagegen.ids import validate_tenant_id
from imagegen.serve.audit import AuditWriter
from imagegen.serve.errors import ApiError
from imagegen.serve.store import ServeStore
from imagegen.serve.tenancy import Caller, character_for


class CharacterService:
    """Character registration and management for the HTTP layer, run off the event loop."""

    def __init__(self, registry: Registry, store: ServeStore, db: Callable[..., Any], audit: AuditWriter):
        self.registry = registry
        self.store = store
        self.db = db
        self.audit = audit
        #: registration analyses faces: CPU-heavy, so fewer at once than database calls
        self.cpu_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cpu")

    async def _cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, fn, *args)

    async def register(
        self,
        caller: Caller,
        character_id: str,
        name: str,
        provenance: dict,
        files: list[tuple[str, bytes]],
        card: dict | None,
        tenant: str | None = None,
    ) -> Any:
        """Register a draft owned by the caller's tenant (``tenant``: admin only, any tenant)."""
        from imagegen.identity.characters import register_character

        if tenant is not None and tenant != caller.tenant and not caller.admin:
            raise ApiError(403, "forbidden", "only an admin key registers characters for another tenant", "tenant")
        owner = validate_tenant_id(tenant) if tenant is not None else caller.tenant

        def register() -> Any:
            return register_character(
                self.registry,
                character_id=character_id,
                name=name,
                provenance=provenance,
                files=files,
                card=card,
                tenant=owner,
            )

        return await self._cpu(register)

    async def approve(self, caller: Caller, character_id: str) -> Any:
        from imagegen.identity.characters import approve_character

        await self.db(character_for, self.registry, character_id, caller)
        return await self._cpu(approve_character, self.registry, character_id)

    async def all(self, caller: Caller, status: str | None) -> list:
        return await self.db(lambda: self.registry.characters.all(status=status, tenant=caller.tenant_filter))

    async def get(self, caller: Caller, character_id: str) -> Any:
        return await self.db(character_for, self.registry, character_id, caller)

    async def delete(self, caller: Caller, character_id: str) -> tuple[Any, dict[str, int]]:
        """Delete the character, then everything the service rendered of it: (registry report, purge counts)."""
        await self.db(character_for, self.registry, character_id, caller)
        # rows of renders this replica already answered are written before the tombstone, so the
        # purge redacts and counts them; rows queued after it are redacted as they are written
        await self.audit.flush()
        report = await self.db(self.registry.characters.delete, character_id)
        await self.audit.flush()  # this replica's queued rows are redacted by the purge, not after it
        purged = await self.db(self.store.purge_character, character_id)
        return report, purged
