"""A design's *draft identity*: the conditioning of its pick, for turnaround renders, without a character.

The pick is not a registered character, and must not become a half-registered one to be rendered
from. Its identity is computed by the very code registration uses (``IdentityMethod.compute`` on
the pick images, as ``ConditioningCache`` does for references), cached as safetensors in the
design's own folder (deleted with it), and reached by renderers through ``DraftAwareIdentity``:
an ``IdentityProvider`` that answers a design's *draft key* (a random ``draft-<hex>`` name
stored with the design) from the design store and everything else from the registry provider it
wraps. A draft key is only ever rendered by a design's own jobs: ids with the drafts' prefix
are reserved (``imagegen.ids.DRAFT_PREFIX``: no character can be registered under one, and the
public routes answer an unknown character for one), so knowing a draft key (the design's images
name it in their metadata) lets nobody render its identity or delete its jobs.
"""

from __future__ import annotations

import io
import logging
from collections import OrderedDict

import torch
from PIL import Image

from imagegen.faces.errors import NoFaceError
from imagegen.identity.conditioning import MAX_IDENTITY_REFERENCES, CharacterNotRenderableError, IdentityMethod
from imagegen.identity.design.store import Design, DesignStore
from imagegen.ids import is_draft_key
from imagegen.pipelines.conditioning import Conditioner, IdentityProvider, Tensors
from imagegen.pipelines.presets import Preset
from imagegen.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: draft identities one renderer keeps in memory
DRAFT_LRU_SIZE = 16


def pick_images(store: DesignStore, design: Design) -> list[Image.Image]:
    """The design's pick as RGB images (at most what a multi-image identity encoder takes)."""
    ids = list((design.pick or {}).get("image_ids") or [])[:MAX_IDENTITY_REFERENCES]
    return [Image.open(io.BytesIO(store.image_bytes(design, i))).convert("RGB") for i in ids]


def draft_tensors(store: DesignStore, design: Design, method: IdentityMethod) -> Tensors:
    """The pick's conditioning for ``method``: read from the design's folder, computed (and cached) on a miss."""
    name = f"{method.name}-{method.version}-{method.weights_hash[:16]}"
    cached = store.draft_tensors(design.id, name)
    if cached is not None:
        return cached
    images = pick_images(store, design)
    if not images:
        raise CharacterNotRenderableError("this design has no pick yet: pick a candidate or upload an image first")
    log.info("computing the %s draft identity of design %s from %d image(s)", method.name, design.id, len(images))
    try:
        computed = method.compute(images)
    except NoFaceError as exc:
        raise NoFaceError(
            f"the pick has no face that {method.name}'s face model finds ({exc}); pick another candidate or upload "
            "an image with a clear face"
        ) from None
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in computed.items()}
    store.put_draft_tensors(design.id, name, tensors)
    return tensors


class DraftAwareIdentity:
    """An ``IdentityProvider`` answering design draft keys from the design store, the rest from ``inner``."""

    def __init__(self, inner: IdentityProvider, settings: Settings | None = None, store: DesignStore | None = None):
        self.inner = inner
        self.settings = settings or get_settings()
        self._store = store
        self._lru: OrderedDict[tuple, Tensors] = OrderedDict()

    def __getattr__(self, name: str):
        # the registry provider's extras (registry, conditioning_cache, allow_draft ...) stay reachable
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def store(self) -> DesignStore:
        if self._store is None:
            self._store = DesignStore.open(self.settings)
        return self._store

    def resolve_method(self, preset: Preset, requested: str | None) -> str:
        return self.inner.resolve_method(preset, requested)

    def load(self, name: str, preset: Preset, device: torch.device, dtype: torch.dtype) -> Conditioner:
        return self.inner.load(name, preset, device, dtype)

    def tensors_for(self, character: str, conditioner: Conditioner, version: int | None = None) -> Tensors:
        if not is_draft_key(character):
            return self.inner.tensors_for(character, conditioner, version)
        design = self.store.by_draft_key(character)
        if design is None or not isinstance(conditioner, IdentityMethod):
            for stale in [k for k in self._lru if k[0] == character]:
                del self._lru[stale]
            raise CharacterNotRenderableError("this design's draft identity is gone (the design was deleted)")
        pick = tuple((design.pick or {}).get("image_ids") or [])
        key = (character, pick, conditioner.name, conditioner.weights_hash)
        if key not in self._lru:
            self._lru[key] = draft_tensors(self.store, design, conditioner)
            while len(self._lru) > DRAFT_LRU_SIZE:
                self._lru.popitem(last=False)
        self._lru.move_to_end(key)
        return self._lru[key]
