"""The identity a renderer gets: methods by name and each character's tensors, from the registry.

``RegistryIdentity`` implements ``imagegen.pipelines.conditioning.IdentityProvider``. It owns
what the pipelines must not know: which characters exist, which may be rendered (approved, or
drafts for an artist's preview), and where their tensors are cached. A render reads each of its
characters from the registry once (so a deleted or re-registered character is seen at once) and
keeps the tensors themselves in a small in-memory LRU keyed by the character's registration (id,
creation time, version — versions never restart for a re-used id) and the method's weights:
nothing deleted or replaced renders from memory, and a sweep drops the tensors of characters that
were deleted or changed (``forget_stale``) so their bytes do not linger either.

``refusal`` is the one render policy, shared with the service's edge check: approved (or a
draft whose reference report passed, for an artist's preview), and an apparent age that was
verified unless the deployment allows unverified characters (development only).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

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
#: how often the in-memory tensors are checked against the registry (deleted or changed characters)
SWEEP_EVERY_S = 5.0


@dataclass(frozen=True)
class Refusal:
    """Why a character may not be rendered: an error code and a message that says what to do."""

    code: str
    message: str


def refusal(character: Character, *, allow_draft: bool, allow_unverified_age: bool) -> Refusal | None:
    """Why ``character`` may not be rendered under this policy, or None when it may."""
    cid = character.id
    if character.status != "approved":
        if not allow_draft:
            return Refusal(
                "character_not_renderable",
                f"character '{cid}' is a draft; approve it first (`imagegen characters approve {cid}` "
                f"or POST /v1/characters/{cid}/approve)",
            )
        if character.report_passed is not True:
            return Refusal(
                "character_not_renderable",
                f"draft '{cid}' has no passing reference report; fix its references "
                f"(`imagegen characters check {cid}`) before previewing it",
            )
    if character.age_check == "failed":
        return Refusal("age_check_failed", f"character '{cid}' failed the apparent-age gate; it never renders")
    if character.age_check != "passed" and not allow_unverified_age:
        return Refusal(
            "age_unverified",
            f"character '{cid}' has an unverified apparent age; install an age estimator and re-check it "
            "(`imagegen characters approve` re-runs the gate), or set IMAGEGEN_ALLOW_UNVERIFIED_AGE=1 "
            "on a development deployment",
        )
    return None


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
        self._swept_at = time.monotonic()

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
        try:
            character = self.registry.characters.get(character_id)
        except Exception:
            self._drop(character_id)
            raise
        refused = refusal(
            character, allow_draft=self.allow_draft, allow_unverified_age=self.settings.allow_unverified_age
        )
        if refused is not None:
            raise CharacterNotRenderableError(refused.message)
        return character

    def _drop(self, character_id: str, keep: tuple | None = None) -> None:
        """Forget every cached registration of ``character_id`` but ``keep`` (id, created at, version)."""
        for key in [k for k in self._lru if k[0] == character_id and k[:3] != keep]:
            del self._lru[key]

    def forget_stale(self) -> int:
        """Drop the tensors of characters deleted or changed since they were cached; returns how many."""
        self._swept_at = time.monotonic()
        cached = {key[:3] for key in self._lru}
        if not cached:
            return 0
        current = self.registry.characters.registrations(key[0] for key in cached)
        stale = [key for key in self._lru if (key[0], *current.get(key[0], ())) != key[:3]]
        for key in stale:
            del self._lru[key]
        return len(stale)

    def tensors_for(
        self, character: str, conditioner: IdentityMethod, version: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Cached conditioning of a character: memory, then the registry, computed only on a miss.

        ``version``: the registration the request was accepted for; another one (the character changed, or was
        deleted and registered again under its id) is refused, never rendered in its place.
        """
        if time.monotonic() - self._swept_at > SWEEP_EVERY_S:
            self.forget_stale()
        found = self.renderable(character)
        if version is not None and found.version != version:
            raise CharacterNotRenderableError(
                f"character '{character}' changed since this request was accepted (version {version}, now "
                f"{found.version}); send the request again"
            )
        registration = (found.id, found.created_at, found.version)
        self._drop(found.id, keep=registration)
        key = (*registration, conditioner.name, conditioner.weights_hash)
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
    """A ``Renderer`` of ``preset`` whose characters come from ``registry`` (opened from settings if None).

    Design draft keys (``identity/design/drafts.py``) are answered from the design store: a design's
    turnaround renders its pick's identity before any character exists.
    """
    from imagegen.identity.design.drafts import DraftAwareIdentity

    settings = settings or get_settings()
    provider = DraftAwareIdentity(RegistryIdentity(registry, settings, allow_draft=allow_draft), settings)
    return Renderer(preset, settings=settings, device=device, identity=provider)
