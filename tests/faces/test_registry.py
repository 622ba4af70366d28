"""Backend names, the per-process cache and the Face record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imagegen import samples
from imagegen.errors import ConfigError, ImagegenError
from imagegen.faces import (
    Face,
    FaceResult,
    NoFaceError,
    UnknownFaceBackendError,
    available_backends,
    backend_family,
    get_analyzer,
)
from imagegen.faces.dlib_backend import DlibAnalyzer
from imagegen.settings import get_settings


def test_available_backends():
    assert available_backends() == ["dlib", "dlib-cnn", "insightface"]
    assert backend_family("dlib-cnn") == "dlib"
    assert backend_family("insightface:buffalo_l") == "insightface"


@pytest.mark.parametrize("name", ["facenet", "dlib:hog", "insightface:", ""])
def test_unknown_backend_lists_the_known_ones(name, monkeypatch):
    if name == "":
        monkeypatch.setenv("IMAGEGEN_FACE_BACKEND", "deepface")
        get_settings.cache_clear()
    try:
        with pytest.raises(UnknownFaceBackendError) as info:
            get_analyzer(name or None)
    finally:
        monkeypatch.delenv("IMAGEGEN_FACE_BACKEND", raising=False)
        get_settings.cache_clear()
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ImagegenError)
    assert "known backends: dlib, dlib-cnn, insightface" in str(info.value)
    assert info.value.code == "unknown_face_backend"


def test_default_backend_is_dlib_and_cached(dlib_analyzer):
    assert get_settings().face_backend == "dlib"
    assert get_analyzer() is dlib_analyzer
    assert isinstance(dlib_analyzer, DlibAnalyzer)


def test_face_json_round_trip(astronaut_results):
    result = astronaut_results["original"]
    text = json.dumps(result.to_dict())
    back = FaceResult.from_dict(json.loads(text))
    assert back.face.bbox == result.face.bbox
    np.testing.assert_allclose(back.face.landmarks, result.face.landmarks)
    np.testing.assert_allclose(back.face.embedding, result.face.embedding)
    assert back.face.embedding.dtype == np.float32
    assert (back.face.backend, back.face.model_version) == (result.face.backend, result.face.model_version)
    assert back.image_size == result.image_size
    face = Face.from_dict(json.loads(json.dumps(result.face.to_dict())))
    assert face.area == pytest.approx(result.face.area)


def test_face_basics():
    face = Face(bbox=(10, 20, 40, 60), landmarks=np.arange(10), det_score=0.9)
    assert (face.width, face.height, face.area) == (30.0, 40.0, 1200.0)
    np.testing.assert_array_equal(face.landmark("nose"), [4, 5])
    assert not face.has_embedding
    assert face.to_dict()["embedding"] is None
    with pytest.raises(ValueError, match="no embedding"):
        face.normed_embedding  # noqa: B018
    embedded = face.with_embedding(np.array([3.0, 4.0]), backend="insightface", model_version="x")
    np.testing.assert_allclose(embedded.normed_embedding, [0.6, 0.8])
    assert face.embedding is None  # the original is untouched
    with pytest.raises(NoFaceError):
        FaceResult(face=None).require()


def test_samples_are_rgb_and_deterministic():
    astronaut = samples.astronaut()
    assert astronaut.mode == "RGB" and astronaut.size == (512, 512)
    assert samples.grace_hopper().size == (512, 600)
    assert samples.no_face_image().mode == "RGB"
    for kind in samples.AUGMENTATIONS:
        a = samples.augment(astronaut, kind, seed=1, face_box=samples.ASTRONAUT_FACE_BOX)
        b = samples.augment(astronaut, kind, seed=1, face_box=samples.ASTRONAUT_FACE_BOX)
        assert a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b)), kind
    crop = samples.augment(astronaut, "crop", seed=2, face_box=samples.ASTRONAUT_FACE_BOX)
    assert crop.width < 512 or crop.height < 512
    assert samples.augment(astronaut, "jpeg", quality=90).size == astronaut.size
    with pytest.raises(ValueError, match="unknown augmentation"):
        samples.augment(astronaut, "blur")  # type: ignore[arg-type]
