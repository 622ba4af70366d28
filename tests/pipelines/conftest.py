"""Renderers are loaded once per test session: loading is what a real deployment does once too."""

from __future__ import annotations

import pytest

from imagegen.pipelines.renderer import Renderer


@pytest.fixture(scope="session")
def flux_renderer() -> Renderer:
    return Renderer("tiny-flux")


@pytest.fixture(scope="session")
def sdxl_renderer() -> Renderer:
    return Renderer("tiny-sdxl")


@pytest.fixture(params=["tiny-flux", "tiny-sdxl"])
def renderer(request, flux_renderer, sdxl_renderer) -> Renderer:
    return {"tiny-flux": flux_renderer, "tiny-sdxl": sdxl_renderer}[request.param]
