"""Character registration and management for the HTTP layer, off the event loop.

Registration and approval analyse faces (CPU-heavy: a small pool of their own); reads and deletes
are database calls (the render service's pool). The workflows themselves are
``imagegen.identity.characters`` and the registry's character store; this only schedules them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imagegen.identity.registry import Registry


class CharacterService:
    """Character registration and management for the HTTP layer, run off the event loop."""

    def __init__(self, registry: Registry, db: Callable[..., Any]):
        self.registry = registry
        self.db = db
        #: registration analyses faces: CPU-heavy, so fewer at once than database calls
        self.cpu_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cpu")

    async def _cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, fn, *args)

    async def register(
        self, character_id: str, name: str, provenance: dict, files: list[tuple[str, bytes]], card: dict | None
    ) -> Any:
        from imagegen.identity.characters import register_character

        def register() -> Any:
            return register_character(
                self.registry, character_id=character_id, name=name, provenance=provenance, files=files, card=card
            )

        return await self._cpu(register)

    async def approve(self, character_id: str) -> Any:
        from imagegen.identity.characters import approve_character

        return await self._cpu(approve_character, self.registry, character_id)

    async def all(self, status: str | None) -> list:
        return await self.db(lambda: self.registry.characters.all(status=status))

    async def get(self, character_id: str) -> Any:
        return await self.db(self.registry.characters.get, character_id)

    async def delete(self, character_id: str) -> Any:
        return await self.db(self.registry.characters.delete, character_id)
