"""The tiny presets' stand-in face detector looks at the pixels: it never finds a face in a blank or noise image,
and finds the bundled astronaut's face where it is. It is a stand-in, and says so."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from imagegen import samples
from imagegen.faces import analyzer_for_pack
from imagegen.standins.faces import arcface_recognizer_model, pixel_scrfd_detector_model

pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    pack = tmp_path_factory.mktemp("standin") / "antelopev2"
    pack.mkdir()
    onnx.save(pixel_scrfd_detector_model(), str(pack / "scrfd_10g_bnkps.onnx"))
    onnx.save(arcface_recognizer_model(), str(pack / "glintr100.onnx"))
    return analyzer_for_pack(pack)


def overlap(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_no_face_in_blank_or_noise_images(analyzer):
    rng = np.random.default_rng(0)
    for image in (
        np.full((256, 256, 3), 128, np.uint8),
        np.zeros((256, 256, 3), np.uint8),
        (rng.random((256, 256, 3)) * 255).astype(np.uint8),
    ):
        assert analyzer.detect(image) == []


def test_finds_the_astronaut_where_she_is_and_follows_the_pixels(analyzer):
    [face] = analyzer.detect(samples.astronaut())
    assert overlap(face.bbox, samples.ASTRONAUT_FACE_BOX) > 0.5
    [flipped] = analyzer.detect(samples.astronaut().transpose(0))  # PIL FLIP_LEFT_RIGHT
    assert flipped.bbox[0] > face.bbox[0] + 30  # the box moved with the face
    assert "+standin" in analyzer.model_version and analyzer.describe()["standin"] is True
