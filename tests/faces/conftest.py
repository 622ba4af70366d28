"""Face fixtures: real dlib models on real public-domain photos, analysed once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from imagegen import samples
from imagegen.faces import FaceAnalyzer, FaceResult, get_analyzer
from imagegen.standins.faces import write_tiny_pack


@pytest.fixture(scope="session")
def dlib_analyzer() -> FaceAnalyzer:
    return get_analyzer("dlib")


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    return samples.astronaut()


@pytest.fixture(scope="session")
def grace_hopper() -> Image.Image:
    return samples.grace_hopper()


@pytest.fixture(scope="session")
def astronaut_variants(astronaut: Image.Image) -> dict[str, Image.Image]:
    """The astronaut and one variant per augmentation kind (same person throughout)."""
    variants = {"original": astronaut}
    for kind in samples.AUGMENTATIONS:
        variants[kind] = samples.augment(astronaut, kind, seed=0, face_box=samples.ASTRONAUT_FACE_BOX)
    return variants


@pytest.fixture(scope="session")
def astronaut_results(dlib_analyzer: FaceAnalyzer, astronaut_variants) -> dict[str, FaceResult]:
    return {name: dlib_analyzer.largest(image) for name, image in astronaut_variants.items()}


@pytest.fixture(scope="session")
def hopper_result(dlib_analyzer: FaceAnalyzer, grace_hopper: Image.Image) -> FaceResult:
    return dlib_analyzer.largest(grace_hopper)


@pytest.fixture(scope="session")
def tiny_insightface_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An insightface root holding generated stand-in packs (antelopev2 and buffalo_l)."""
    root = tmp_path_factory.mktemp("insightface-root")
    write_tiny_pack(root, "antelopev2")
    write_tiny_pack(root, "buffalo_l")
    return root
