"""Per-character identity conditioning: the adapter protocol and the cache in front of it.

The renderer knows only ``IdentityMethod``: prepare tensors from a character's references
(once; cached in the registry), attach to a loaded pipeline (once), and condition one batch with
per-sample tensors, weights and start steps. PuLID and the IP-Adapter family implement it.

Why the cache matters: computing identity runs face detection, alignment, parsing, a ViT and the
ID encoder. The reference code does that on every request; here it runs once per (character,
method, method version, weights hash) and a render only reads a few kilobytes of tensors.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image

from imagegen.errors import ImagegenError
from imagegen.identity.models import Character
from imagegen.identity.registry import Registry

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


@dataclass
class IdentitySample:
    """The identity of one sample of a batch; ``tensors`` None (and weight 0) for a sample without one."""

    tensors: dict[str, torch.Tensor] | None
    weight: float
    start_step: int = 0


@dataclass
class BatchConditioning:
    """What a method adds to one pipeline call."""

    #: extra keyword arguments for the pipeline call
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: called after every denoising step (``callback_on_step_end`` signature); None when not needed
    on_step_end: Callable | None = None


class IdentityMethod(ABC):
    """One way of putting a character's face into a pipeline (PuLID, IP-Adapter, ...)."""

    #: the name presets and requests use, e.g. "pulid-flux-v0.9.1"
    name: ClassVar[str]
    #: the pipeline family it works with ("flux" / "sdxl")
    family: ClassVar[str]
    #: bump when the way tensors are computed changes (part of the cache key)
    version: ClassVar[str]

    @property
    @abstractmethod
    def weights_hash(self) -> str:
        """Identifies the weights that computed cached tensors (part of the cache key)."""

    @abstractmethod
    def compute(self, references: list[Image.Image]) -> dict[str, torch.Tensor]:
        """A character's conditioning tensors from its reference images (CPU tensors)."""

    @abstractmethod
    def attach(self, pipe) -> None:
        """Install the method's layers or hooks on ``pipe`` (once per loaded pipeline)."""

    @abstractmethod
    def detach(self, pipe) -> None:
        """Remove everything ``attach`` installed; the pipeline renders as if never attached."""

    @abstractmethod
    @contextmanager
    def conditioning(self, pipe, samples: list[IdentitySample], cfg: bool = False) -> Iterator[BatchConditioning]:
        """Condition the pipeline calls made inside the ``with`` block on ``samples``.

        ``cfg``: the pipeline runs a negative pass too (SDXL CFG, FLUX true CFG); the method
        gives it the unconditional identity.
        """


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
        return [
            Image.open(io.BytesIO(self.registry.reference_bytes(character.id, ref.digest))).convert("RGB")
            for ref in chosen
        ]

    def get(self, character: Character, method: IdentityMethod) -> dict[str, torch.Tensor]:
        key = (character.id, method.name, method.version, method.weights_hash)
        cached = self.registry.get_conditioning(*key)
        if cached is not None:
            return cached
        log.info("computing %s conditioning for %s", method.name, character.id)
        tensors = {
            k: v.detach().to("cpu").contiguous() for k, v in method.compute(self.usable_references(character)).items()
        }
        self.computed += 1
        self.registry.put_conditioning(
            *key,
            tensors,
            meta={"references": min(len(character.references), MAX_IDENTITY_REFERENCES)},
            expected_version=character.version,
        )
        return tensors
