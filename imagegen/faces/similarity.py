"""How alike two face embeddings are: one API, the metric and threshold chosen per backend.

Callers never hard-code a metric or a threshold: they pass :class:`~imagegen.faces.types.Face`
objects (which carry their backend) or arrays plus a backend name, and get a *similarity* where
higher always means more alike.

- ``dlib`` (ResNet 128-d): dlib compares descriptors by Euclidean distance ``d`` and documents
  ``d < 0.6`` as "same person" (99.38% on LFW; dlib's ``dnn_face_recognition_ex.cpp`` and the
  ``face_recognition`` library's default ``tolerance=0.6``). We report ``similarity = 1 - d``:
  monotone, exact, and the threshold becomes ``1 - 0.6 = 0.4``. Measured on the bundled photos
  (``imagegen.samples``): the astronaut and her augmentations pairwise at similarity 0.76-1.0;
  astronaut vs Grace Hopper 0.30 for the originals but up to 0.40 across augmentations, i.e.
  right at the threshold. 0.6 is dlib's operating point, loose for two different people with
  similar portraits; a gate that must not accept a look-alike can ask for more than
  :func:`threshold` (0.5, i.e. distance 0.5, still keeps every same-person pair here).
- ``insightface`` (ArcFace 512-d, antelopev2 / buffalo_l): cosine similarity of the embeddings.
  Threshold 0.35. ArcFace verification thresholds in common use sit between ~0.28 and 0.4;
  insightface 2.1's own GUI defaults to 0.4 (``insightface/gui/core/constants.py``) and its
  ``PersonConfig`` uses 0.45 for its newer packs. We take a little less than 0.4 because
  rendered faces embed further from their references than photos of the same person do. It has
  *not* been re-measured here: the real packs are not available in this environment.

:func:`centroid` averages embeddings in the way the metric expects (unit vectors for cosine,
a plain mean for Euclidean), for "identity of a reference set" vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from imagegen.faces.errors import EmbeddingMismatchError, UnknownFaceBackendError
from imagegen.faces.registry import backend_family
from imagegen.faces.types import Face

EmbeddingLike = Face | np.ndarray | Sequence[float]


@dataclass(frozen=True)
class Metric:
    """How one backend's embeddings are compared."""

    backend: str
    kind: Literal["cosine", "euclidean"]
    #: similarity at or above which two faces count as the same person
    threshold: float
    #: the same threshold in the backend's native distance, where it has one
    distance_threshold: float | None
    #: where the threshold comes from
    source: str


METRICS: dict[str, Metric] = {
    "dlib": Metric(
        backend="dlib",
        kind="euclidean",
        threshold=0.4,
        distance_threshold=0.6,
        source="dlib: Euclidean distance < 0.6 = same person (99.38% LFW); similarity = 1 - distance",
    ),
    "insightface": Metric(
        backend="insightface",
        kind="cosine",
        threshold=0.35,
        distance_threshold=None,
        source="ArcFace cosine; common verification thresholds 0.28-0.4 (insightface GUI default 0.4)",
    ),
}


def metric_for(backend: str) -> Metric:
    """The metric of ``backend`` (``Face.backend``, or any analyser name such as ``dlib-cnn``)."""
    metric = METRICS.get(backend)
    if metric is None:
        metric = METRICS.get(backend_family(backend))  # raises UnknownFaceBackendError for junk
    if metric is None:  # pragma: no cover - every family has a metric
        raise UnknownFaceBackendError(f"no similarity metric for face backend {backend!r}")
    return metric


def threshold(backend: str | None = None) -> float:
    """The same-identity threshold of ``backend`` on the similarity scale."""
    return metric_for(_default_backend(backend)).threshold


def similarity(a: EmbeddingLike, b: EmbeddingLike, backend: str | None = None) -> float:
    """How alike two embeddings are (higher = more alike), with ``backend``'s metric.

    ``a`` and ``b`` are :class:`Face` objects or vectors. With faces, the backend is read from
    them (and they must come from the same model); with vectors, pass ``backend`` (default: the
    configured ``face_backend``).
    """
    name = _resolve_backend([a, b], backend)
    return float(similarities(_vector(a), [_vector(b)], name)[0])


def similarities(query: EmbeddingLike, gallery: Sequence[EmbeddingLike], backend: str | None = None) -> np.ndarray:
    """Similarity of ``query`` to each item of ``gallery`` (vectorised), shape ``(len(gallery),)``."""
    name = _resolve_backend([query, *gallery], backend)
    q = _vector(query)
    if len(gallery) == 0:
        return np.zeros((0,), dtype=np.float32)
    g = np.stack([_vector(x) for x in gallery])
    if g.shape[1] != q.shape[0]:
        raise EmbeddingMismatchError(
            f"embedding sizes differ ({q.shape[0]} vs {g.shape[1]}): they come from different models"
        )
    metric = metric_for(name)
    if metric.kind == "cosine":
        return (_unit(g) @ _unit(q)).astype(np.float32)
    return (1.0 - np.linalg.norm(g - q, axis=1)).astype(np.float32)


def same_identity(
    a: EmbeddingLike, b: EmbeddingLike, backend: str | None = None, *, min_similarity: float | None = None
) -> bool:
    """Whether ``a`` and ``b`` look like the same person: similarity >= the backend's threshold.

    ``min_similarity`` replaces the threshold for a stricter (or looser) gate on the same scale.
    """
    name = _resolve_backend([a, b], backend)
    limit = metric_for(name).threshold if min_similarity is None else float(min_similarity)
    return similarity(a, b, name) >= limit


def centroid(embeddings: Sequence[EmbeddingLike], backend: str | None = None) -> np.ndarray:
    """The mean identity vector of ``embeddings``, comparable with :func:`similarity`.

    Cosine backends: unit-normalise each, average, renormalise (so every vector weighs the
    same). Euclidean (dlib): the plain mean, which minimises the summed squared distance.
    """
    if len(embeddings) == 0:
        raise ValueError("centroid of no embeddings")
    name = _resolve_backend(list(embeddings), backend)
    vectors = np.stack([_vector(e) for e in embeddings])
    if metric_for(name).kind == "cosine":
        return _unit(_unit(vectors).mean(axis=0)).astype(np.float32)
    return vectors.mean(axis=0).astype(np.float32)


def _default_backend(backend: str | None) -> str:
    if backend is not None:
        return backend
    from imagegen.settings import get_settings

    return get_settings().face_backend


def _resolve_backend(items: Sequence[EmbeddingLike], backend: str | None) -> str:
    faces = [x for x in items if isinstance(x, Face)]
    spaces = {(f.backend, f.model_version) for f in faces}
    if len(spaces) > 1:
        listed = ", ".join(f"{b or '?'} ({v or 'unknown model'})" for b, v in sorted(spaces))
        raise EmbeddingMismatchError(
            f"cannot compare embeddings from different models: {listed}; analyse every image with the same face backend"
        )
    if spaces:
        ((face_backend, _),) = spaces
        if backend is not None and face_backend and metric_for(backend).backend != face_backend:
            raise EmbeddingMismatchError(f"faces were embedded by {face_backend!r} but compared as {backend!r}")
        backend = backend or face_backend or None
    return metric_for(_default_backend(backend)).backend  # unknown -> UnknownFaceBackendError


def _vector(x: EmbeddingLike) -> np.ndarray:
    if isinstance(x, Face):
        if x.embedding is None:
            raise ValueError("this face has no embedding yet; use analyzer.analyze() or analyzer.embed()")
        return x.embedding.astype(np.float32)
    v = np.asarray(x, dtype=np.float32).reshape(-1)
    if v.size == 0:
        raise ValueError("empty embedding")
    return v


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)
