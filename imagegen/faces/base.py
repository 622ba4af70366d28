"""The one interface every face backend implements, and the helpers they share.

Colour order: every public method takes a PIL image (any mode; converted to RGB) or a numpy
``uint8`` array of shape ``(H, W, 3)`` in **RGB** order (``(H, W)`` greyscale and ``(H, W, 4)``
RGBA are accepted too). Backends convert internally: dlib wants RGB, insightface (OpenCV) BGR.
Never pass an OpenCV ``imread`` array without ``[..., ::-1]``.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from imagegen.faces.types import Face, FaceResult

ImageLike = Image.Image | np.ndarray

#: ONNX metadata key that marks a generated stand-in model (the tiny presets' packs); a stand-in never vouches
STANDIN_METADATA_KEY = "imagegen.standin"


def is_standin_model(model_file: str | os.PathLike | None) -> bool:
    """Whether an ONNX file is one of imagegen's generated stand-ins (marked with :data:`STANDIN_METADATA_KEY`).

    Stand-ins are a few hundred KB; real pack models are >= 16 MB and are not parsed again here.
    """
    if not model_file or Path(model_file).stat().st_size > 8 * 2**20:
        return False
    import onnx

    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception:  # unreadable metadata: not ours, so not a stand-in
        return False
    return any(p.key == STANDIN_METADATA_KEY for p in model.metadata_props)


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """``image`` as a C-contiguous ``uint8`` RGB array ``(H, W, 3)``."""
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got an array of shape {array.shape}")
    array = array[..., :3]
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and float(array.max()) <= 1.0:
            array = array * 255.0
        array = np.clip(array, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def sort_largest_first(faces: list[Face]) -> list[Face]:
    """Faces by box area, largest first (detection score breaks ties)."""
    return sorted(faces, key=lambda f: (f.area, f.det_score), reverse=True)


def model_file_version(path: str | os.PathLike[str]) -> str:
    """``<file stem>-<first 12 hex of sha256>``: names a model file and pins its exact bytes."""
    p = Path(path).resolve()
    stat = p.stat()
    return f"{p.stem}-{_sha256(str(p), stat.st_size, stat.st_mtime_ns)[:12]}"


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key: a replaced file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FaceAnalyzer(ABC):
    """Detect, align and embed faces. One instance per process is enough (see ``get_analyzer``).

    Subclasses implement :meth:`detect` and :meth:`embed`; :meth:`analyze` and :meth:`largest`
    are built on them. Faces come back largest first.
    """

    #: backend name; selects the similarity metric and thresholds (``imagegen.faces.similarity``)
    name: ClassVar[str]
    #: length of the embedding vectors
    embedding_dim: ClassVar[int]

    @property
    @abstractmethod
    def model_version(self) -> str:
        """Identifies the embedding space (model files + hashes); part of every cache key."""

    @abstractmethod
    def detect(self, image: ImageLike) -> list[Face]:
        """All faces (box, 5 landmarks, score; no embedding), largest first."""

    @abstractmethod
    def embed(self, image: ImageLike, face: Face) -> Face:
        """A copy of ``face`` (detected in ``image``) with its embedding filled in."""

    def analyze(self, image: ImageLike) -> list[Face]:
        """All faces with embeddings, largest first."""
        rgb = to_rgb_array(image)
        return [self.embed(rgb, face) for face in self.detect(rgb)]

    def largest(self, image: ImageLike, *, embed_others: bool = False) -> FaceResult:
        """The largest face (embedded) and the others reported (embedded only if asked).

        Policy for several faces: the largest box wins; the others are listed in
        ``FaceResult.others`` so a caller can warn about or refuse a multi-face image.
        """
        rgb = to_rgb_array(image)
        faces = self.detect(rgb)
        size = (int(rgb.shape[1]), int(rgb.shape[0]))
        if not faces:
            return FaceResult(face=None, others=[], image_size=size)
        main = self.embed(rgb, faces[0])
        others = [self.embed(rgb, f) for f in faces[1:]] if embed_others else list(faces[1:])
        return FaceResult(face=main, others=others, image_size=size)

    def describe(self) -> dict[str, object]:
        """What this analyser is, for logs, reports and cache keys."""
        return {"backend": self.name, "model_version": self.model_version, "embedding_dim": self.embedding_dim}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_version={self.model_version!r})"
