"""One similarity API over per-backend metrics and thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from imagegen.faces import (
    EmbeddingMismatchError,
    Face,
    UnknownFaceBackendError,
    centroid,
    metric_for,
    same_identity,
    similarities,
    similarity,
    threshold,
)
from imagegen.settings import get_settings


def _face(embedding, backend="insightface", version="v1") -> Face:
    return Face(
        bbox=(0, 0, 10, 10),
        landmarks=np.zeros((5, 2)),
        det_score=1.0,
        embedding=np.asarray(embedding, np.float32),
        backend=backend,
        model_version=version,
    )


def test_thresholds_per_backend():
    assert threshold("dlib") == pytest.approx(0.4)
    assert metric_for("dlib").distance_threshold == pytest.approx(0.6)
    assert metric_for("dlib").kind == "euclidean"
    assert threshold("insightface") == pytest.approx(0.35)
    assert metric_for("insightface").kind == "cosine"
    # analyser names map onto their family's metric
    assert metric_for("dlib-cnn") is metric_for("dlib")
    assert metric_for("insightface:buffalo_l") is metric_for("insightface")


def test_dlib_similarity_is_one_minus_euclidean_distance():
    a, b = np.zeros(128, np.float32), np.zeros(128, np.float32)
    b[0] = 0.59
    assert similarity(a, b, "dlib") == pytest.approx(1 - 0.59)
    assert same_identity(a, b, "dlib")
    b[0] = 0.61
    assert not same_identity(a, b, "dlib")
    assert same_identity(a, b, "dlib", min_similarity=0.3)


def test_cosine_similarity_ignores_scale():
    a = np.array([3.0, 4.0, 0.0])
    assert similarity(a, 10 * a, "insightface") == pytest.approx(1.0)
    assert similarity(a, np.array([0.0, 0.0, 1.0]), "insightface") == pytest.approx(0.0)
    assert similarity(a, -a, "insightface") == pytest.approx(-1.0)


def test_faces_carry_their_backend():
    a = _face([1.0, 0.0])
    b = _face([1.0, 1.0])
    assert similarity(a, b) == pytest.approx(np.sqrt(0.5), abs=1e-6)
    scores = similarities(a, [a, b])
    assert scores.shape == (2,) and scores[0] == pytest.approx(1.0)


@pytest.mark.parametrize(("configured", "expected"), [("dlib", -1.0), ("insightface", 0.0)])
def test_default_backend_comes_from_settings(monkeypatch, configured, expected):
    monkeypatch.setenv("IMAGEGEN_FACE_BACKEND", configured)
    get_settings.cache_clear()
    try:
        a, b = np.array([1.0, 0.0, 0.0, 0.0]), np.array([0.0, 1.0, 1.0, 1.0])
        # dlib: 1 - |a - b| = 1 - 2; cosine: orthogonal vectors = 0
        assert similarity(a, b) == pytest.approx(expected)
        assert threshold() == threshold(configured)
    finally:
        monkeypatch.delenv("IMAGEGEN_FACE_BACKEND")
        get_settings.cache_clear()


def test_mixing_models_is_refused():
    with pytest.raises(EmbeddingMismatchError, match="different models"):
        similarity(_face([1.0, 0.0], version="a"), _face([1.0, 0.0], version="b"))
    with pytest.raises(EmbeddingMismatchError, match="different models"):
        similarity(_face([1.0, 0.0]), _face([1.0, 0.0], backend="dlib"))
    with pytest.raises(EmbeddingMismatchError, match="compared as"):
        similarity(_face([1.0, 0.0]), _face([1.0, 0.0]), backend="dlib")
    with pytest.raises(EmbeddingMismatchError, match="sizes differ"):
        similarity(np.ones(128), np.ones(512), "dlib")


def test_unknown_backend():
    with pytest.raises(UnknownFaceBackendError, match="known backends: dlib"):
        similarity(np.ones(3), np.ones(3), "facenet")


def test_face_without_embedding():
    face = _face([1.0])
    face.embedding = None
    with pytest.raises(ValueError, match="no embedding"):
        similarity(face, face)


def test_centroid_cosine_is_unit_and_weighs_vectors_equally():
    vectors = [np.array([10.0, 0.0]), np.array([0.0, 1.0])]
    c = centroid(vectors, "insightface")
    np.testing.assert_allclose(c, [np.sqrt(0.5), np.sqrt(0.5)], atol=1e-6)
    assert c.dtype == np.float32


def test_centroid_dlib_is_the_mean(astronaut_results):
    faces = [r.face for r in astronaut_results.values()]
    c = centroid(faces)
    np.testing.assert_allclose(c, np.mean([f.embedding for f in faces], axis=0), atol=1e-6)
    assert all(same_identity(c, f.embedding, "dlib") for f in faces)
    with pytest.raises(ValueError):
        centroid([], "dlib")
