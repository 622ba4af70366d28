"""Per-character identity conditioning: the adapter protocol and the cache in front of it.

The renderer knows only the ``Conditioner`` protocol of ``imagegen.pipelines.conditioning``
(attach once, condition one batch with per-sample tensors, weights and start steps, detach).
``IdentityMethod`` adds what only the identity side needs: computing the tensors from a
character's references (once; cached in the registry). PuLID and the IP-Adapter family implement it.

Why the cache matters: computing identity runs face detection, alignment, parsing, a ViT and the
ID encoder. The reference code does that on every request; here it runs once per (character,
method, method version, weights hash) and a render only reads a few kilobytes of tensors.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import ClassVar

import torch
from PIL import Image

from imagegen.errors import ImagegenError
from imagegen.identity.models import Character
from imagegen.identity.registry import Registry
from imagegen.pipelines.conditioning import Conditioner

log = logging.getLogger(__name__)

#: at most this many references are fed to a multi-image identity encoder
MAX_IDENTITY_REFERENCES = 4


class IdentityError(ImagegenError):
    code = "identity_error"
    field = "character"


class UnsupportedMethodError(IdentityError):
    code = "unsupported_method"
    field = "method"


class CharacterNotRenderableError(IdentityError):
    code = "character_not_renderable"


class IdentityMethod(Conditioner):
    """A ``Conditioner`` that also computes a character's tensors from its reference images.

    PuLID and the IP-Adapter family implement it; the renderer sees only the ``Conditioner`` part.
    """

    #: bump when the way tensors are computed changes (part of the cache key)
    version: ClassVar[str]

    @abstractmethod
    def compute(self, references: list[Image.Image]) -> dict[str, torch.Tensor]:
        """A character's conditioning tensors from its reference images (CPU tensors)."""


class ConditioningCache:
    """Cached identity tensors in the registry, computed on first use and never on the hot path again."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.computed = 0  # how many times tensors had to be computed (a cache miss)

    def usable_references(self, character: Character) -> list[Image.Image]:
        """The references the reference report found usable (faces, not outliers), best first."""
        import io

        usable = []
        for ref in character.references:
            qualities = [face.quality for face in ref.faces.values()]
            if qualities and all(q.get("usable", True) for q in qualities):
                usable.append(ref)
        if not usable:
            raise CharacterNotRenderableError(
                f"character '{character.id}' has no usable reference face; fix its reference set "
                f"(`imagegen characters report {character.id}`)"
            )
        chosen = usable[:MAX_IDENTITY_REFERENCES]
        read = self.registry.characters.reference_bytes
        return [Image.open(io.BytesIO(read(character.id, ref.digest))).convert("RGB") for ref in chosen]

    def get(self, character: Character, method: IdentityMethod) -> dict[str, torch.Tensor]:
        key = (character.id, method.name, method.version, method.weights_hash)
        cached = self.registry.conditioning.get(*key)
        if cached is not None:
            return cached
        log.info("computing %s conditioning for %s", method.name, character.id)
        tensors = {
            k: v.detach().to("cpu").contiguous() for k, v in method.compute(self.usable_references(character)).items()
        }
        self.computed += 1
        self.registry.conditioning.put(
            *key,
            tensors,
            meta={"references": min(len(character.references), MAX_IDENTITY_REFERENCES)},
            expected_version=character.version,
        )
        return tensors
