"""The character-id and tenant-id rules, shared by every layer.

A render request names its character by id at the edge (HTTP, CLI) and the pipelines check the
slug without knowing anything else about characters; the registry stores characters under the
same rule. Keeping the rule here lets both use it without the pipelines importing the registry.
"""

from __future__ import annotations

import re

from imagegen.errors import ImagegenError

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
#: the ids of design drafts' identities (``draft-<32 hex>``, made by the design store): reserved, so no character can
#: be registered under one and no public route resolves one (a character named like a draft would be rendered with, or
#: delete the jobs of, that draft)
DRAFT_PREFIX = "draft-"


class InvalidCharacterIdError(ImagegenError):
    """A character id that is not a slug."""

    code = "invalid_character_id"
    field = "character_id"


def shown(value: object, limit: int = 70) -> str:
    """``repr(value)``, cut to ``limit`` characters: user input quoted in an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_character_id(value: object) -> str:
    """Return ``value`` if it is a valid character id, else raise ``InvalidCharacterIdError``."""
    if not isinstance(value, str) or not SLUG_RE.fullmatch(value):
        raise InvalidCharacterIdError(
            f"{shown(value)} is not a valid character id: use 1 to 64 characters, lowercase letters "
            "a-z, digits, '-' and '_', starting with a letter or a digit (for example 'mia' or 'mia_v2')"
        )
    return value


def validate_new_character_id(value: object) -> str:
    """``validate_character_id`` for an id about to be registered: the design drafts' prefix is reserved too."""
    character_id = validate_character_id(value)
    if is_draft_key(character_id):
        raise InvalidCharacterIdError(
            f"{shown(value)} is not available: ids starting with {DRAFT_PREFIX!r} are reserved for design drafts; "
            "pick another id"
        )
    return character_id


def is_draft_key(character_id: str) -> bool:
    """Whether ``character_id`` is in the design drafts' reserved namespace."""
    return character_id.startswith(DRAFT_PREFIX)


#: the tenant of rows written before tenancy existed, and of keys created without ``--tenant``
DEFAULT_TENANT = "default"


class InvalidTenantIdError(ImagegenError):
    """A tenant id that is not a slug."""

    code = "invalid_tenant"
    field = "tenant"


def validate_tenant_id(value: object) -> str:
    """Return ``value`` if it is a valid tenant id (the character-id slug rule), else raise."""
    if not isinstance(value, str) or not SLUG_RE.fullmatch(value):
        raise InvalidTenantIdError(
            f"{shown(value)} is not a valid tenant id: use 1 to 64 characters, lowercase letters a-z, "
            "digits, '-' and '_', starting with a letter or a digit (for example 'acme')"
        )
    return value
