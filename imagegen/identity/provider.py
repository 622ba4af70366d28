"""The identity a renderer gets: methods by name and each character's tensors, from the registry.

``RegistryIdentity`` implements ``imagegen.pipelines.conditioning.IdentityProvider``. It owns
what the pipelines must not know: which characters exist, which may be rendered (approved, or
drafts for an artist's preview), and where their tensors are cached. A render reads each of its
characters from the registry once (so a deleted or re-registered character is seen at once) and
keeps the tensors themselves in a small in-memory LRU keyed by the character's registration (id,
creation time, version) and the method's weights: nothing deleted or replaced renders from memory.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from imagegen.identity.conditioning import CharacterNotRenderableError, ConditioningCache, IdentityMethod
from imagegen.identity.methods import create_method, resolve_method
from imagegen.identity.models import Character
from imagegen.identity.registry import Registry
from imagegen.pipelines.presets import Preset
from imagegen.pipelines.renderer import Renderer
from imagegen.settings import Settings, get_settings

#: characters whose identity tensors one provider keeps in memory
IDENTITY_LRU_SIZE = 64


class RegistryIdentity:
    """Identity methods and cached character tensors for one renderer, with its approval policy."""

    def __init__(self, registry: Registry | None = None, settings: Settings | None = None, allow_draft: bool = False):
        self.settings = settings or get_settings()
        self._registry = registry
        #: render characters still in draft (artists previewing); approved only otherwise
        self.allow_draft = allow_draft
        self._cache: ConditioningCache | None = None
        #: (character id, created at, version, method, weights hash) -> tensors: the hot path reads no blobs
        self._lru: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()

    @property
    def registry(self) -> Registry:
        """The registry (opened from the settings on first use: a replica opens it in its own process)."""
        if self._registry is None:
            self._registry = Registry.open(self.settings)
        return self._registry

    @property
    def conditioning_cache(self) -> ConditioningCache:
        if self._cache is None:
            self._cache = ConditioningCache(self.registry)
        return self._cache

    def resolve_method(self, preset: Preset, requested: str | None) -> str:
        return resolve_method(preset, requested)

    def load(self, name: str, preset: Preset, device: torch.device, dtype: torch.dtype) -> IdentityMethod:
        return create_method(name, preset, device, dtype, self.settings)

    def renderable(self, character_id: str) -> Character:
        """The character, if this provider's policy lets it be rendered."""
        character = self.registry.characters.get(character_id)
        if character.status != "approved" and not self.allow_draft:
            raise CharacterNotRenderableError(
                f"character '{character_id}' is a draft; approve it first "
                f"(`imagegen characters approve {character_id}`)"
            )
        return character

    def tensors_for(self, character: str, conditioner: IdentityMethod) -> dict[str, torch.Tensor]:
        """Cached conditioning of a character: memory, then the registry, computed only on a miss."""
        found = self.renderable(character)
        # created_at tells registrations apart: an id deleted and registered again restarts at version 1
        key = (found.id, found.created_at, found.version, conditioner.name, conditioner.weights_hash)
        if key not in self._lru:
            self._lru[key] = self.conditioning_cache.get(found, conditioner)
            while len(self._lru) > IDENTITY_LRU_SIZE:
                self._lru.popitem(last=False)
        self._lru.move_to_end(key)
        return self._lru[key]


def identity_renderer(
    preset: str | Preset,
    registry: Registry | None = None,
    *,
    allow_draft: bool = False,
    settings: Settings | None = None,
    device: str | None = None,
) -> Renderer:
    """A ``Renderer`` of ``preset`` whose characters come from ``registry`` (opened from settings if None)."""
    settings = settings or get_settings()
    provider = RegistryIdentity(registry, settings, allow_draft=allow_draft)
    return Renderer(preset, settings=settings, device=device, identity=provider)
