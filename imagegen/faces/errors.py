"""Errors of the face package (``ImagegenError`` subclasses: the CLI prints them as one line)."""

from __future__ import annotations

from imagegen.errors import ConfigError, ImagegenError


class UnknownFaceBackendError(ConfigError):
    """A face backend name that :func:`imagegen.faces.get_analyzer` does not know."""

    code = "unknown_face_backend"
    field = "face_backend"


class NoFaceError(ImagegenError):
    """An image where a face was required and none was found."""

    code = "no_face"


class EmbeddingMismatchError(ImagegenError):
    """Two embeddings from different backends or models were compared."""

    code = "embedding_mismatch"
