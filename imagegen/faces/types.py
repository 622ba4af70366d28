"""The face record every backend returns, and the result of "the main face of this image"."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imagegen.faces.errors import NoFaceError

#: names of the 5 landmarks, in order. "left"/"right" are as seen in the image (the "left eye" is
#: the subject's right eye). This is insightface's ``kps`` order and the order of the ArcFace
#: 112x112 template and facexlib's 512x512 template, so the landmarks feed either aligner as is.
LANDMARK_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

Box = tuple[float, float, float, float]


@dataclass(eq=False)
class Face:
    """One detected face.

    ``bbox`` is ``(x0, y0, x1, y1)`` in pixels of the analysed image; ``landmarks`` is a ``(5, 2)``
    float32 array of ``(x, y)`` in :data:`LANDMARK_NAMES` order. ``embedding`` is the backend's
    raw output (float32, 1-D; ``None`` until :meth:`FaceAnalyzer.embed` fills it). Compare
    embeddings with :mod:`imagegen.faces.similarity`, never directly: the metric is per backend.
    ``backend`` and ``model_version`` say which embedding space the vector lives in; vectors from
    different spaces are not comparable.
    """

    bbox: Box
    landmarks: np.ndarray
    det_score: float
    embedding: np.ndarray | None = None
    backend: str = ""
    model_version: str = ""

    def __post_init__(self) -> None:
        self.bbox = tuple(float(v) for v in self.bbox)  # type: ignore[assignment]
        if len(self.bbox) != 4:
            raise ValueError(f"bbox must be (x0, y0, x1, y1), got {self.bbox}")
        self.landmarks = np.asarray(self.landmarks, dtype=np.float32).reshape(5, 2)
        self.det_score = float(self.det_score)
        if self.embedding is not None:
            self.embedding = np.asarray(self.embedding, dtype=np.float32).reshape(-1)

    @property
    def width(self) -> float:
        return max(0.0, self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return max(0.0, self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> float:
        """Box area in square pixels (what "largest face" means)."""
        return self.width * self.height

    @property
    def has_embedding(self) -> bool:
        return self.embedding is not None

    @property
    def normed_embedding(self) -> np.ndarray:
        """The embedding scaled to unit L2 norm (what cosine backends compare)."""
        if self.embedding is None:
            raise ValueError("this face has no embedding yet; call analyzer.embed(image, face)")
        norm = float(np.linalg.norm(self.embedding))
        return self.embedding / norm if norm > 0 else self.embedding

    def landmark(self, name: str) -> np.ndarray:
        """One landmark by name (see :data:`LANDMARK_NAMES`)."""
        return self.landmarks[LANDMARK_NAMES.index(name)]

    def with_embedding(self, embedding: np.ndarray, *, backend: str, model_version: str) -> Face:
        """A copy of this face carrying ``embedding`` (the detection itself is unchanged)."""
        return dataclasses.replace(
            self,
            landmarks=self.landmarks.copy(),
            embedding=np.asarray(embedding, dtype=np.float32).reshape(-1),
            backend=backend,
            model_version=model_version,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (lists of floats); :meth:`from_dict` reads it back."""
        return {
            "bbox": [float(v) for v in self.bbox],
            "landmarks": self.landmarks.astype(float).tolist(),
            "det_score": float(self.det_score),
            "embedding": None if self.embedding is None else self.embedding.astype(float).tolist(),
            "backend": self.backend,
            "model_version": self.model_version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Face:
        embedding = data.get("embedding")
        return cls(
            bbox=tuple(data["bbox"]),  # type: ignore[arg-type]
            landmarks=np.asarray(data["landmarks"], dtype=np.float32),
            det_score=float(data["det_score"]),
            embedding=None if embedding is None else np.asarray(embedding, dtype=np.float32),
            backend=str(data.get("backend", "")),
            model_version=str(data.get("model_version", "")),
        )


@dataclass
class FaceResult:
    """The main face of an image under the "largest face wins" policy.

    ``face`` is the largest face (with its embedding) or ``None`` when there is none; ``others``
    lists the other faces found, largest first (detections only, unless asked to embed them), so
    callers can warn about or refuse multi-face images. ``image_size`` is ``(width, height)``.
    """

    face: Face | None
    others: list[Face] = field(default_factory=list)
    image_size: tuple[int, int] | None = None

    @property
    def found(self) -> bool:
        return self.face is not None

    @property
    def count(self) -> int:
        """Number of faces found in the image."""
        return (1 if self.face is not None else 0) + len(self.others)

    @property
    def multiple(self) -> bool:
        return self.count > 1

    def require(self, what: str = "the image") -> Face:
        """The face, or :class:`NoFaceError` telling the user what to do."""
        if self.face is None:
            size = f" ({self.image_size[0]}x{self.image_size[1]})" if self.image_size else ""
            raise NoFaceError(
                f"no face found in {what}{size}: use a photo where one face is clearly visible, "
                "frontal or three-quarter, at least about 40 pixels wide"
            )
        return self.face

    def to_dict(self) -> dict[str, Any]:
        return {
            "face": None if self.face is None else self.face.to_dict(),
            "others": [f.to_dict() for f in self.others],
            "image_size": None if self.image_size is None else list(self.image_size),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaceResult:
        face = data.get("face")
        size = data.get("image_size")
        return cls(
            face=None if face is None else Face.from_dict(face),
            others=[Face.from_dict(f) for f in data.get("others", [])],
            image_size=None if size is None else (int(size[0]), int(size[1])),
        )
