"""``bench/finish_overlap.py``: a busy replica's throughput with its stamps behind the next batch against in line
(what it measures and that both arms really ran, not how fast)."""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.append(str(BENCH))  # after the installed packages: bench modules shadow nothing

import finish_overlap  # noqa: E402


def test_finish_overlap_compares_both_arms_on_a_backlog(isolated_home, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_ALLOW_UNVERIFIED_AGE", "1")
    args = argparse.Namespace(
        preset="tiny-flux", size=32, steps=1, batch=2, requests=6, rounds=1, torch_threads=1, json=None
    )
    # a loop of its own, in a thread: the Studio tests' Playwright (sync API) keeps one running in this thread
    with ThreadPoolExecutor(1) as pool:
        figures = pool.submit(finish_overlap.measure, args).result()
    assert set(figures["arms"]) == {"overlapped", "in line"}
    for arm in figures["arms"].values():
        assert arm["batches"] == 3 and arm["images_per_s"] > 0 and 0 < arm["renderer_busy"] <= 1.0
        assert arm["stamp_ms"] > 0
    # in both of the overlapped arm's backlogs (warm-up round and measured), the two batches with one queued behind
    # them were stamped behind the renderer, the last in line; the in-line arm never handed any over
    assert figures["batches_finished_behind"] == 4
    assert figures["speedup"] > 0
