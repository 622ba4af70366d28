"""The insightface backend: clear errors without weights, never a download, and the real loading
path (insightface's FaceAnalysis + model_zoo routing) on generated stand-in ONNX models."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from imagegen import samples
from imagegen.errors import ModelNotAvailableError
from imagegen.faces import FaceAnalyzer, get_analyzer, same_identity, similarity
from imagegen.faces.insightface_backend import InsightFaceAnalyzer, find_pack_dir
from imagegen.settings import get_settings
from imagegen.standins.faces import (
    DEFAULT_FACE_BOX,
    arcface_recognizer_model,
    write_arcface_recognizer,
    write_scrfd_detector,
)

# insightface 2.1's aligner calls a scikit-image API deprecated in 0.26 (the backend silences it at
# import, but pytest resets warning filters for every test)
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


@pytest.fixture
def no_downloads(monkeypatch: pytest.MonkeyPatch):
    """Trip-wires on insightface's download functions: any call fails the test."""
    # import_module: ``insightface.utils.download`` as an attribute is the re-exported function
    face_analysis = importlib.import_module("insightface.app.face_analysis")
    model_zoo = importlib.import_module("insightface.model_zoo.model_zoo")
    download = importlib.import_module("insightface.utils.download")
    storage = importlib.import_module("insightface.utils.storage")

    calls: list[tuple] = []

    def tripwire(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"insightface tried to download: {args}")

    monkeypatch.setattr(download, "download_file", tripwire)
    monkeypatch.setattr(storage, "download_file", tripwire)
    monkeypatch.setattr(storage, "download", tripwire)
    monkeypatch.setattr(face_analysis, "ensure_available", tripwire)
    monkeypatch.setattr(model_zoo, "download_onnx", tripwire)
    yield calls
    assert calls == []


@pytest.fixture
def insightface_root(monkeypatch: pytest.MonkeyPatch):
    """Point IMAGEGEN_INSIGHTFACE_ROOT somewhere for one test."""

    def use(root: Path) -> Path:
        monkeypatch.setenv("IMAGEGEN_INSIGHTFACE_ROOT", str(root))
        get_settings.cache_clear()
        return root

    yield use
    monkeypatch.delenv("IMAGEGEN_INSIGHTFACE_ROOT", raising=False)
    get_settings.cache_clear()


def test_missing_pack_names_pack_directory_and_license(tmp_path, no_downloads, insightface_root):
    root = insightface_root(tmp_path / "empty-root")
    with pytest.raises(ModelNotAvailableError) as info:
        get_analyzer("insightface")
    message = str(info.value)
    assert "'antelopev2'" in message
    assert str(root / "models" / "antelopev2") in message
    assert "IMAGEGEN_INSIGHTFACE_ROOT" in message
    assert "non-commercial" in message
    assert "never downloads" in message
    assert not root.exists()  # nothing was created, let alone downloaded


def test_missing_other_pack_and_empty_directory(tmp_path, no_downloads):
    (tmp_path / "models" / "buffalo_l").mkdir(parents=True)
    with pytest.raises(ModelNotAvailableError, match=r"'buffalo_l' is not installed: .*buffalo_l is empty"):
        InsightFaceAnalyzer("buffalo_l", root=tmp_path)
    with pytest.raises(ModelNotAvailableError, match="invalid insightface pack name"):
        find_pack_dir("../escape", tmp_path)


def test_pack_without_recognizer_is_reported(tmp_path, no_downloads):
    write_scrfd_detector(tmp_path / "models" / "antelopev2" / "scrfd_10g_bnkps.onnx")
    with pytest.raises(ModelNotAvailableError, match="no recognition model"):
        InsightFaceAnalyzer(root=tmp_path, device="cpu")


def test_generated_models_route_like_the_real_ones(tiny_insightface_root):
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    pack = tiny_insightface_root / "models" / "antelopev2"
    detector = get_model(str(pack / "scrfd_10g_bnkps.onnx"), providers=["CPUExecutionProvider"])
    recognizer = get_model(str(pack / "glintr100.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(detector, SCRFD) and detector.use_kps and detector.fmc == 3
    assert isinstance(recognizer, ArcFaceONNX)
    assert recognizer.input_size == (112, 112) and recognizer.output_shape[-1] == 512
    assert (recognizer.input_mean, recognizer.input_std) == (127.5, 127.5)  # not taken for an mxnet export


def test_get_analyzer_insightface_end_to_end(tiny_insightface_root, no_downloads, insightface_root, astronaut):
    insightface_root(tiny_insightface_root)
    analyzer = get_analyzer("insightface")
    assert isinstance(analyzer, InsightFaceAnalyzer) and isinstance(analyzer, FaceAnalyzer)
    assert analyzer is get_analyzer("insightface")  # cached per process and configuration
    assert analyzer.pack == "antelopev2" and analyzer.is_standin
    assert analyzer.model_version.startswith("antelopev2/glintr100-") and analyzer.model_version.endswith("+standin")

    result = analyzer.largest(astronaut)
    face = result.require()
    assert face.backend == "insightface"
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert np.isfinite(face.embedding).all() and np.linalg.norm(face.embedding) > 0
    assert face.det_score == pytest.approx(0.99)
    # the stand-in's box, mapped back from the 640x640 letterboxed input (512 px -> scale 1.25)
    np.testing.assert_allclose(face.bbox, np.array(DEFAULT_FACE_BOX) / 1.25, atol=1e-3)
    left_eye, right_eye, nose, *_ = face.landmarks
    assert left_eye[0] < nose[0] < right_eye[0]
    # deterministic, and comparable through the one similarity API (cosine)
    again = analyzer.analyze(np.asarray(astronaut))[0]
    assert similarity(face, again) == pytest.approx(1.0, abs=1e-5)
    assert same_identity(face, again)


def test_buffalo_l_pack_by_name(tiny_insightface_root, no_downloads, insightface_root, grace_hopper):
    insightface_root(tiny_insightface_root)
    analyzer = get_analyzer("insightface:buffalo_l")
    assert analyzer.pack == "buffalo_l"
    assert analyzer.model_version.startswith("buffalo_l/w600k_r50-")
    assert analyzer.analyze(grace_hopper)[0].embedding.shape == (512,)


def test_zip_nested_pack_directory_is_found(tmp_path, no_downloads, astronaut):
    nested = tmp_path / "models" / "antelopev2" / "antelopev2"
    write_scrfd_detector(nested / "scrfd_10g_bnkps.onnx")
    write_arcface_recognizer(nested / "glintr100.onnx")
    analyzer = InsightFaceAnalyzer(root=tmp_path, device="cpu")
    assert analyzer.pack_dir == nested.resolve()
    assert len(analyzer.detect(samples.no_face_image())) == 1  # the stand-in reports a face everywhere


def test_recognizer_generator_makes_other_signatures():
    model = arcface_recognizer_model(input_size=128, embedding_dim=256, seed=3)
    dims = [d.dim_value or d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 256]
    props = {p.key: p.value for p in model.metadata_props}
    assert "stand-in" in json.dumps(props)
    with pytest.raises(ValueError):
        arcface_recognizer_model(input_size=100)
