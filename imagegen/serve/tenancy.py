"""Who is asking: the caller of a request (its key, its tenant) and what that caller may see.

Every API key belongs to one tenant; characters, jobs and audit rows carry the tenant that owns
them. A key sees and renders only its own tenant's characters; ``admin`` spans tenants. A
character of another tenant is answered exactly like one that does not exist (404, same code and
message), so a key cannot probe which ids other tenants use — except at registration, where ids
are global and a taken id is a 409 whoever took it.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagegen.identity.models import Character, UnknownCharacterError
from imagegen.identity.registry import Registry
from imagegen.ids import is_draft_key
from imagegen.serve.store import ApiKey


@dataclass(frozen=True)
class Caller:
    """The key behind a request, reduced to what the services decide on."""

    key_id: str
    tenant: str
    scopes: tuple[str, ...]

    @classmethod
    def of(cls, key: ApiKey) -> Caller:
        return cls(key_id=key.id, tenant=key.tenant, scopes=tuple(key.scopes))

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def sees(self, tenant: str) -> bool:
        """Whether this caller may see a resource owned by ``tenant``."""
        return self.admin or tenant == self.tenant

    @property
    def tenant_filter(self) -> str | None:
        """The tenant a listing is restricted to (None: every tenant, for admin)."""
        return None if self.admin else self.tenant


def unknown_character(character_id: str) -> UnknownCharacterError:
    """The error for a character that does not exist *for this caller* (never says whose it is)."""
    return UnknownCharacterError(
        f"no character {character_id!r}; GET /v1/characters lists the characters this key can use"
    )


def visible(character: Character, caller: Caller) -> Character:
    """``character`` if ``caller`` may see it; otherwise the not-found error."""
    if not caller.sees(character.tenant):
        raise unknown_character(character.id)
    return character


def character_for(registry: Registry, character_id: str, caller: Caller) -> Character:
    """The character ``caller`` may see (blocking); missing and foreign ones raise the same error.

    An id in the design drafts' reserved namespace is unknown here whatever the registry holds: a draft's identity is
    rendered by its design's own jobs only (:mod:`imagegen.identity.design.drafts`).
    """
    if is_draft_key(character_id):
        raise unknown_character(character_id)
    try:
        character = registry.characters.get(character_id)
    except UnknownCharacterError:
        raise unknown_character(character_id) from None
    return visible(character, caller)
