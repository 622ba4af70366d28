"""``bench/own_work.py``: imagegen's own per-request work in one process, through the real ingress and a real
renderer replica's code, with and without a render before it (what it measures, not how fast)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.append(str(BENCH))  # after the installed packages: bench modules shadow nothing

import own_work  # noqa: E402


def run(canned: bool) -> dict:
    args = argparse.Namespace(
        preset="tiny-flux", size=32, steps=1, requests=4, warmup=1, canned=canned, cprofile=None, json=None
    )
    # a loop of its own, in a thread: the Studio tests' Playwright (sync API) keeps one running in this thread
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, own_work.measure(args)).result()


def test_own_work_splits_a_served_render_into_the_render_and_imagegens_own_work(isolated_home, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_ALLOW_UNVERIFIED_AGE", "1")
    rendered = run(canned=False)
    assert rendered["mode"] == "render" and rendered["requests"] == 4
    assert rendered["render_p50_ms"] > 0 and rendered["own_work_p50_ms"] > 0
    phases = rendered["phases_p50_ms"]
    # the ingress's phases and the replica's: the stamp is imagegen's work, the render is not
    assert {"auth", "parse", "ingress", "respond", "render", "stamp", "total"} <= set(phases)
    assert phases["total"] > phases["render"] + phases["stamp"]
    canned = run(canned=True)  # the same code stamping one image again: no render in its figures
    assert canned["mode"] == "canned" and canned["render_p50_ms"] == 0.0 and "render" not in canned["phases_p50_ms"]
    assert canned["phases_p50_ms"]["stamp"] > 0
