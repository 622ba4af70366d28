"""Safeguards on who can become a character.

The characters are fictional. Three checks keep it that way, each a feature with tests:

- **Provenance** is required to register (``synthetic`` | ``consented`` | ``licensed``, with who,
  when and evidence; enforced by ``imagegen.identity.models.Provenance``), and approval requires
  a passing reference report.
- **Protected-identity gallery**: embeddings (never images) of people who must not be rendered.
  A reference whose face matches any protected embedding refuses the whole registration.
- **Apparent-age gate**: a pluggable estimator (insightface's ``genderage`` model in production)
  must find every reference face at or above ``min_apparent_age`` (default 25: a "Challenge 25"
  margin over 18, because apparent-age estimates err by several years). Without an estimator
  the character is recorded ``age_check: unverified``; strict mode refuses it instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from imagegen.errors import ImagegenError
from imagegen.faces import Face, FaceAnalyzer, FaceResult
from imagegen.faces.base import is_standin_model
from imagegen.faces.similarity import metric_for, similarities
from imagegen.settings import Settings, get_settings

log = logging.getLogger(__name__)


logger = logging.getLogger(__name__)


class SafeguardError(ImagegenError):
    """Registration refused by a safeguard."""

    code = "safeguard_refused"
    field = "images"


class ProtectedIdentityMatchError(SafeguardError):
    code = "protected_identity"


class AgeGateError(SafeguardError):
    code = "age_gate"


# --------------------------------------------------------------------------- protected gallery


@dataclass
class ProtectedMatch:
    reference_index: int
    filename: str
    protected_id: int
    label: str
    similarity: float


def protected_matches(registry, results: list[FaceResult], filenames: list[str], backend: str) -> list[ProtectedMatch]:
    """Every (reference, protected identity) pair whose faces are the same person by ``backend``."""
    gallery = registry.gallery.all(backend=backend)
    if not gallery:
        return []
    metric = metric_for(backend)
    vectors = [np.asarray(p.embedding, dtype=np.float32) for p in gallery]
    matches = []
    for index, result in enumerate(results):
        faces = [f for f in ([result.face] if result.face else []) + list(result.others) if f.embedding is not None]
        for face in faces:
            scores = similarities(face.embedding, vectors, metric.backend)
            for protected, score in zip(gallery, scores, strict=True):
                if score >= metric.threshold:
                    matches.append(ProtectedMatch(index, filenames[index], protected.id, protected.label, float(score)))
    return matches


def check_protected(registry, results: list[FaceResult], filenames: list[str], backend: str) -> None:
    """Refuse when any reference face matches the protected-identity gallery."""
    matches = protected_matches(registry, results, filenames, backend)
    if matches:
        listed = ", ".join(f"{m.filename} ~ '{m.label}' ({m.similarity:.2f})" for m in matches)
        raise ProtectedIdentityMatchError(
            f"registration refused: reference faces match protected identities: {listed}. "
            "Characters must be fictional or consented; remove these images."
        )


def protect_from_images(registry, label: str, images, analyzer: FaceAnalyzer, note: str = "") -> list[int]:
    """Add a protected identity from photos: only the embeddings are kept, the images are not.

    Characters registered *before* the face was protected are checked at once: every character
    (any tenant, approved or draft) with a reference face that matches goes back to ``draft``
    with a failed report, so neither the service nor a preview renders it again
    (``suspend_matching_characters``).
    """
    ids, embeddings = [], []
    for image in images:
        face = analyzer.largest(image.image).face
        if face is None:
            raise SafeguardError(f"{image.filename}: no face found; a protected identity needs a clear face photo")
        ids.append(registry.gallery.add(label, analyzer.name, face.embedding, note=note).id)
        embeddings.append(face.embedding)
    suspended = suspend_matching_characters(registry, analyzer.name, embeddings)
    if suspended:
        logger.warning("protected '%s': suspended matching characters %s (back to draft)", label, suspended)
    return ids


def suspend_matching_characters(registry, backend: str, embeddings: list) -> list[str]:
    """Characters with a stored reference face matching any of ``embeddings`` by ``backend``: set to
    draft with a failed report (their stored analyses, so no image is decoded). Returns their ids."""
    if not embeddings:
        return []
    metric = metric_for(backend)
    vectors = [np.asarray(e, dtype=np.float32) for e in embeddings]
    suspended = []
    for character in registry.characters.all():
        stored = [ref.faces[backend].embedding for ref in character.references if backend in ref.faces]
        scores = [max(similarities(np.asarray(e, np.float32), vectors, metric.backend)) for e in stored]
        if any(score >= metric.threshold for score in scores):
            registry.characters.set_status(character.id, "draft")
            registry.characters.set_report_passed(character.id, False)
            suspended.append(character.id)
    return suspended


# --------------------------------------------------------------------------- apparent age


class AgeEstimator(Protocol):
    """Estimates the apparent age of a detected face."""

    name: str

    def estimate(self, image: np.ndarray, face: Face) -> float:
        """Apparent age in years of ``face`` in the RGB ``image``."""


class InsightFaceAgeEstimator:
    """insightface's ``genderage`` attribute model (ships in the buffalo_l / antelopev2 packs)."""

    name = "insightface-genderage"

    def __init__(self, model_file: Path):
        from insightface.model_zoo import model_zoo

        self.model_file = Path(model_file)
        self.model = model_zoo.get_model(str(self.model_file), providers=["CPUExecutionProvider"])
        if getattr(self.model, "taskname", None) != "genderage":
            raise SafeguardError(f"{model_file} is not an insightface genderage model")
        self.model.prepare(ctx_id=-1)
        #: a generated stand-in (tiny presets, tests) may refuse a face but never vouches for one
        self.is_standin = is_standin_model(self.model_file)
        if self.is_standin:
            self.name = "insightface-genderage+standin"

    def estimate(self, image: np.ndarray, face: Face) -> float:
        from insightface.app.common import Face as InsightFace

        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        target = InsightFace(bbox=np.asarray(face.bbox, dtype=np.float32))
        _, age = self.model.get(bgr, target)
        return float(age)


def find_age_estimator(settings: Settings | None = None) -> AgeEstimator | None:
    """insightface's genderage model when a pack that has one is installed, else None.

    Looked for under ``IMAGEGEN_INSIGHTFACE_ROOT/models/<pack>/`` first, then in the packs ``imagegen models pull``
    fetched into the model cache (the identity methods' ``faces`` assets).
    """
    settings = settings or get_settings()
    root = settings.insightface_home / "models"
    for pack in ("antelopev2", "buffalo_l"):
        candidate = root / pack / "genderage.onnx"
        if candidate.exists():
            return InsightFaceAgeEstimator(candidate)
    from imagegen.pipelines.assets import AssetStore, load_manifest

    store, manifest = AssetStore(settings.model_cache), load_manifest(settings)
    for pack in ("antelopev2", "buffalo_l"):
        fetched = store.fetched_files(manifest.assets[pack]) if pack in manifest.assets else None
        for path in fetched or []:
            if path.name == "genderage.onnx":
                return InsightFaceAgeEstimator(path)
    return None


@dataclass
class AgeCheck:
    status: str  # "passed" | "unverified" | "failed"
    estimator: str | None
    min_age: int
    ages: list[float | None] = field(default_factory=list)


def check_age(
    images: list[np.ndarray],
    results: list[FaceResult],
    filenames: list[str],
    estimator: AgeEstimator | None,
    min_age: int,
    strict: bool,
) -> AgeCheck:
    """Run the apparent-age gate over every reference face; raise when it refuses."""
    if estimator is None:
        if strict:
            raise AgeGateError(
                "registration refused: no apparent-age estimator is installed and the age gate is strict. "
                "Install the insightface buffalo_l or antelopev2 pack (genderage.onnx) under "
                f"{get_settings().insightface_home / 'models'}, or run with IMAGEGEN_STRICT_AGE_GATE=false "
                "to record the character as age_check=unverified."
            )
        return AgeCheck("unverified", None, min_age, [None] * len(results))
    ages: list[float | None] = []
    for image, result in zip(images, results, strict=True):
        faces = [f for f in ([result.face] if result.face else []) + list(result.others)]
        ages.append(min((estimator.estimate(image, f) for f in faces), default=None))
    young = [(name, age) for name, age in zip(filenames, ages, strict=True) if age is not None and age < min_age]
    if young:
        listed = ", ".join(f"{name} (~{age:.0f})" for name, age in young)
        raise AgeGateError(
            f"registration refused: faces look younger than {min_age}: {listed}. Characters must look clearly adult."
        )
    if getattr(estimator, "is_standin", False):
        # a stand-in's "adult" means nothing: the character stays unverified (and strict mode refuses it)
        if strict:
            raise AgeGateError(
                f"registration refused: the apparent-age estimator ({estimator.name}) is a generated stand-in, not a "
                "real model, and the age gate is strict. Install a real genderage.onnx (insightface buffalo_l or "
                "antelopev2 pack)."
            )
        return AgeCheck("unverified", estimator.name, min_age, ages)
    return AgeCheck("passed", estimator.name, min_age, ages)
