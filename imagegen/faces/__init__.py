"""Detect, align and embed faces; compare embeddings. Backends: ``dlib`` and ``insightface``.

Typical use::

    from imagegen.faces import get_analyzer, same_identity, similarity

    analyzer = get_analyzer()            # settings.face_backend, cached per process
    result = analyzer.largest(image)     # PIL image or RGB uint8 array
    face = result.require("the reference photo")
    score = similarity(face, other_face) # metric and threshold follow face.backend

Images are RGB (PIL or ``(H, W, 3)`` uint8 arrays); landmarks are 5 points in insightface's
order (see :data:`LANDMARK_NAMES`). Backend modules import their heavy dependencies lazily.
"""

from imagegen.faces.base import FaceAnalyzer, ImageLike, to_rgb_array
from imagegen.faces.errors import EmbeddingMismatchError, NoFaceError, UnknownFaceBackendError
from imagegen.faces.registry import (
    analyzer_for_pack,
    available_backends,
    backend_family,
    clear_analyzer_cache,
    get_analyzer,
)
from imagegen.faces.similarity import Metric, centroid, metric_for, same_identity, similarities, similarity, threshold
from imagegen.faces.types import LANDMARK_NAMES, Face, FaceResult

__all__ = [
    "analyzer_for_pack",
    "LANDMARK_NAMES",
    "EmbeddingMismatchError",
    "Face",
    "FaceAnalyzer",
    "FaceResult",
    "ImageLike",
    "Metric",
    "NoFaceError",
    "UnknownFaceBackendError",
    "available_backends",
    "backend_family",
    "centroid",
    "clear_analyzer_cache",
    "get_analyzer",
    "metric_for",
    "same_identity",
    "similarities",
    "similarity",
    "threshold",
    "to_rgb_array",
]
