"""Access to the parity fixtures (tests/fixtures/parity): the seeding recipe and the recorded figures.

``seeded.py`` is the fixtures' own recipe, loaded from the fixture directory so the tests rebuild exactly the
weights and inputs the reference implementation was run with.
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache, lru_cache
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "parity"
#: tolerances of the fixtures' README
RTOL = 1e-3
ATOL = 1e-4


@lru_cache(maxsize=1)
def seeded():
    spec = importlib.util.spec_from_file_location("parity_seeded", FIXTURES / "seeded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def max_abs_error(tensor: torch.Tensor, expected: dict) -> float:
    got = seeded().summary(tensor)
    return max(abs(a - b) for a, b in zip(got["head"] + got["tail"], expected["head"] + expected["tail"], strict=True))


def assert_matches(tensor: torch.Tensor, expected: dict, what: str = "output") -> float:
    """Compare with a recorded summary (shape, abs_sum and l2 to rtol, head/tail values to atol)."""
    got = seeded().summary(tensor)
    assert got["shape"] == expected["shape"], f"{what}: shape {got['shape']} != {expected['shape']}"
    for key in ("abs_sum", "l2"):
        close = abs(got[key] - expected[key]) <= RTOL * abs(expected[key])
        assert close, f"{what}: {key} {got[key]} != {expected[key]}"
    error = max_abs_error(tensor, expected)
    assert error <= ATOL, f"{what}: head/tail differ by up to {error}"
    return error
