"""Who each character is, in the embedding space of the scoring backend.

A ``CharacterIdentity`` is the reference centroid plus the embedding of every reference face,
for one face backend. It comes from:

- the registry (a registered character): the stored centroid and reference embeddings when they
  were made by the same model as the scoring analyser, otherwise the reference images are
  re-analysed (scoring with another embedder than the one that conditioned the render is the
  point: it does not flatter the method);
- the bundled public-domain photos (``sample: astronaut`` / ``sample: grace_hopper``): the photo
  and same-person augmentations of it, analysed in-process;
- any list of images (tests, ``identity_from_images``).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from imagegen import samples
from imagegen.errors import ImagegenError
from imagegen.faces import FaceAnalyzer, FaceResult, centroid, metric_for

log = logging.getLogger(__name__)


class IdentityError(ImagegenError):
    """A character cannot be turned into a reference identity for scoring."""

    code = "identity_error"
    field = "character"


@dataclass
class CharacterIdentity:
    """A character's identity for one face backend: centroid + every reference embedding."""

    id: str
    name: str
    backend: str
    model_version: str
    centroid: np.ndarray
    references: np.ndarray  # (n_references, dim)
    source: str
    reference_names: list[str] = field(default_factory=list)
    #: the character's version in the registry, 0 elsewhere
    version: int = 0
    registered: bool = False
    #: what identity conditioning would see (registry version + reference digests): part of the
    #: render cache key, so changed references re-render the identity cells
    fingerprint: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "backend": self.backend,
            "model_version": self.model_version,
            "source": self.source,
            "references": len(self.references),
            "reference_names": self.reference_names,
            "version": self.version,
            "fingerprint": self.fingerprint,
        }


# -- builders --------------------------------------------------------------------------------------
def identity_from_results(
    character_id: str,
    results: Sequence[FaceResult],
    backend: str,
    model_version: str,
    *,
    name: str | None = None,
    source: str = "images",
    names: Sequence[str] | None = None,
    version: int = 0,
    registered: bool = False,
) -> CharacterIdentity:
    """An identity from analysed reference images (images without a face are left out)."""
    faces = [(i, r.face) for i, r in enumerate(results) if r.face is not None and r.face.embedding is not None]
    if not faces:
        raise IdentityError(
            f"character {character_id!r} has no reference image with a detectable face for backend "
            f"{backend!r}: add clear, front-facing reference photos"
        )
    family = metric_for(backend).backend
    vectors = np.stack([f.embedding for _, f in faces]).astype(np.float32)
    labels = [names[i] if names else f"reference {i}" for i, _ in faces]
    return CharacterIdentity(
        id=character_id,
        name=name or character_id,
        backend=family,
        model_version=model_version,
        centroid=centroid(list(vectors), family),
        references=vectors,
        source=source,
        reference_names=labels,
        version=version,
        registered=registered,
    )


def identity_from_images(
    character_id: str,
    images: Sequence[Image.Image | np.ndarray],
    analyzer: FaceAnalyzer,
    *,
    name: str | None = None,
    names: Sequence[str] | None = None,
    source: str = "images",
) -> CharacterIdentity:
    """Analyse ``images`` with ``analyzer`` and build the identity from the faces found."""
    results = [analyzer.largest(image) for image in images]
    return identity_from_results(
        character_id, results, analyzer.name, analyzer.model_version, name=name, names=names, source=source
    )


def identity_from_sample(character_id: str, sample: str, analyzer: FaceAnalyzer, name: str | None = None):
    """An identity from a bundled public-domain photo and its augmentations (:mod:`imagegen.samples`)."""
    if sample not in samples.PHOTOS:
        raise IdentityError(f"unknown sample photo {sample!r}; choose one of {', '.join(samples.PHOTOS)}")
    named = samples.reference_images(sample)
    return identity_from_images(
        character_id,
        [image for _, image in named],
        analyzer,
        name=name or samples.NAMES[sample],
        names=[n for n, _ in named],
        source=f"sample:{sample}",
    )


def identity_from_registry(registry: Any, character_id: str, analyzer: FaceAnalyzer) -> CharacterIdentity:
    """The identity of a registered character for ``analyzer``'s backend.

    Stored reference embeddings are used when the same model made them; otherwise every
    reference image is analysed again with ``analyzer``.
    """
    character = registry.characters.get(character_id)
    family = metric_for(analyzer.name).backend
    stored = []
    for ref in character.references:
        face = ref.faces.get(analyzer.name) or ref.faces.get(family)
        if face is not None and face.model_version == analyzer.model_version:
            stored.append((ref.filename or ref.digest[:12], face.as_array()))
    usable_refs = [ref for ref in character.references if ref.faces]
    if stored and len(stored) >= len(usable_refs):
        names = [n for n, _ in stored]
        vectors = np.stack([v for _, v in stored]).astype(np.float32)
        # the registry's centroid leaves the reference report's outliers out: prefer it
        kept = character.centroid(analyzer.name)
        if kept is None:
            kept = character.centroid(family)
        if kept is None or kept.shape != vectors.shape[1:]:
            kept = centroid(list(vectors), family)
        return CharacterIdentity(
            id=character.id,
            name=character.name,
            backend=family,
            model_version=analyzer.model_version,
            centroid=kept,
            references=vectors,
            source="registry",
            reference_names=names,
            version=character.version,
            registered=True,
            fingerprint=_fingerprint(character),
        )
    log.info("re-analysing the references of %s with %s", character_id, analyzer.name)
    fingerprint = _fingerprint(character)
    names, results = [], []
    for ref in character.references:
        data = registry.characters.reference_bytes(character.id, ref.digest)
        with Image.open(io.BytesIO(data)) as image:
            results.append(analyzer.largest(image.convert("RGB")))
        names.append(ref.filename or ref.digest[:12])
    identity = identity_from_results(
        character.id,
        results,
        analyzer.name,
        analyzer.model_version,
        name=character.name,
        source="registry (re-analysed)",
        names=names,
        version=character.version,
        registered=True,
    )
    identity.fingerprint = fingerprint
    return identity


def _fingerprint(character: Any) -> str:
    digest = hashlib.sha256("\n".join(character.digests).encode()).hexdigest()[:16]
    return f"v{character.version}-{digest}"


def resolve_identity(spec: str, analyzer: FaceAnalyzer, registry: Any | None = None) -> CharacterIdentity:
    """``sample:<photo>`` (bundled photo) or a registered character id."""
    if spec.startswith("sample:"):
        sample = spec.split(":", 1)[1]
        return identity_from_sample(spec, sample, analyzer)
    if registry is None:
        from imagegen.identity.registry import Registry

        with Registry.open() as opened:
            return identity_from_registry(opened, spec, analyzer)
    return identity_from_registry(registry, spec, analyzer)
