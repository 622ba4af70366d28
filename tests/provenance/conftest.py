"""The 1024 px real photo stamped once per session by the code that stamps every service output."""

from __future__ import annotations

import pytest

from tests.provenance.helpers import Stamped, photo_1024, stamp_photo


@pytest.fixture(scope="session")
def stamped_1024() -> Stamped:
    """The 1024 px photo stamped as PNG (development signer of the session's IMAGEGEN_HOME)."""
    return stamp_photo(photo_1024())
