"""The consistency gate's scorer: the largest face of a rendered image against a character's centroid.

It runs in the renderer replica, on the image the pipeline just produced (no PNG round trip).
The face backend is named by the call (the service picks the configured one,
``IMAGEGEN_FACE_BACKEND``); the registry stores one centroid per backend family
(``Character.centroids[family]``). Scores use ``imagegen.faces.similarity`` (higher = more alike,
on the backend's own scale); an image in which no face is found scores ``None`` and never passes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image

from imagegen.faces import backend_family, get_analyzer, similarity, threshold
from imagegen.settings import get_settings


class GateScorer:
    """Scores images against a centroid; one analyser per process, used under a lock."""

    def __init__(self, backend: str | None = None):
        self.backend = backend or get_settings().face_backend
        self.family = backend_family(self.backend)
        self._lock = threading.Lock()

    @property
    def default_threshold(self) -> float:
        return threshold(self.family)

    def score(self, image: Image.Image, centroid: Sequence[float] | np.ndarray) -> float | None:
        with self._lock:
            result = get_analyzer(self.backend).largest(image.convert("RGB"))
        if result.face is None or not result.face.has_embedding:
            return None
        return round(similarity(result.face, np.asarray(centroid, dtype=np.float32), self.family), 4)
