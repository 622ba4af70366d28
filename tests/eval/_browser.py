"""Open a report in headless Chromium (Debian's ``chromium``) and take a screenshot."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,900",
)


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it)")


def screenshot(page: Path, tmp_path: Path) -> np.ndarray:
    """The first 1200x900 of ``page`` as an RGB array."""
    shot = tmp_path / "screenshot.png"
    profile = tmp_path / "chromium-profile"
    command = [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    with Image.open(shot) as image:
        return np.asarray(image.convert("RGB"))


def assert_shows_images(pixels: np.ndarray) -> None:
    """Not blank, and showing pictures: many colours and textured (non-flat) regions."""
    assert pixels.shape[:2] == (900, 1200)
    flat = pixels.reshape(-1, 3)
    non_white = (flat < 245).any(axis=1).mean()
    colours = len(np.unique(flat[::3], axis=0))
    assert non_white > 0.05, f"the page is blank ({non_white:.1%} non-white pixels)"
    assert colours > 2000, f"only {colours} colours on screen: the images are not shown"
