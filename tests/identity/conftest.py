"""Identity fixtures: one real dlib analyser for the session."""

from __future__ import annotations

import pytest

from imagegen.faces import FaceAnalyzer, get_analyzer


@pytest.fixture(scope="session")
def dlib() -> FaceAnalyzer:
    return get_analyzer("dlib")
