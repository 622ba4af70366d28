"""Evaluation fixtures: real faces (dlib) on public-domain photos, analysed once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagegen.eval.identities import CharacterIdentity, identity_from_images
from imagegen.eval.thresholds import ResolvedThresholds, resolve_thresholds
from imagegen.faces import FaceAnalyzer, FaceResult, get_analyzer
from tests.eval._faces import reference_images, render_images


@pytest.fixture(autouse=True)
def _own_thresholds_file(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tests never read (or write) the repository's configs/thresholds.yaml."""
    path = tmp_path_factory.mktemp("thresholds") / "thresholds.yaml"
    monkeypatch.setenv("IMAGEGEN_EVAL_THRESHOLDS_FILE", str(path))
    return path


@pytest.fixture(scope="session")
def dlib() -> FaceAnalyzer:
    return get_analyzer("dlib")


@pytest.fixture(scope="session")
def dlib_thresholds() -> ResolvedThresholds:
    return resolve_thresholds("dlib", thresholds_file=Path("/nonexistent/thresholds.yaml"))


@pytest.fixture(scope="session")
def identities(dlib: FaceAnalyzer) -> dict[str, CharacterIdentity]:
    return {
        p: identity_from_images(p, reference_images(p), dlib, names=[f"{p}-ref{i}" for i in range(5)])
        for p in ("astronaut", "hopper")
    }


@pytest.fixture(scope="session")
def astronaut_renders(dlib: FaceAnalyzer) -> list[FaceResult]:
    return [dlib.largest(image) for image in render_images("astronaut", 10, seed=20)]


@pytest.fixture(scope="session")
def hopper_renders(dlib: FaceAnalyzer) -> list[FaceResult]:
    return [dlib.largest(image) for image in render_images("hopper", 6, seed=40)]
