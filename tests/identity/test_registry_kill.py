"""Kill a registering process (SIGKILL, a real subprocess) and check the registry is all-or-nothing.

The child (``_register_child.py``) registers one character with many references. It is killed
at chosen hook points (a blob written, all blobs written, rows flushed but not committed, just
after the commit) and at random moments. After each kill a fresh Registry must see either the
complete character or no trace of it, and ``gc()`` must remove the orphan blobs.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from imagegen.blobstore import BlobStore
from imagegen.identity.registry import Registry

from ._helpers import make_refs

CHILD = Path(__file__).with_name("_register_child.py")
CHARACTER_ID = "kill-me"
N_REFS = 40

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def start_child(home: Path, pause_at: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(home), str(N_REFS), pause_at],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def read_line(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"the child printed nothing for {timeout}s: {proc.stderr.read()}")
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise AssertionError(f"the child exited ({proc.returncode}): {proc.stderr.read()}")
    return line.strip()


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def check_all_or_nothing(home: Path) -> bool:
    """Assert the registry holds the whole character or nothing; gc; return whether it is there."""
    registry = Registry(f"sqlite:///{home / 'registry.db'}", BlobStore(home / "blobs"))
    try:
        tables = registry.dump()["tables"]
        present = registry.characters.exists(CHARACTER_ID)
        if present:
            character = registry.characters.get(CHARACTER_ID)
            expected = make_refs(N_REFS, backends=("dlib", "insightface"))
            assert len(character.references) == N_REFS
            for ref, given in zip(character.references, expected, strict=True):
                assert registry.characters.reference_bytes(CHARACTER_ID, ref.digest) == given.data
                assert set(ref.faces) == {"dlib", "insightface"}
                for backend in ("dlib", "insightface"):
                    np.testing.assert_array_equal(ref.faces[backend].as_array(), given.faces[backend].as_array())
            assert character.centroids == {"dlib": [0.5] * 8}
            assert len(tables["face_analyses"]) == 2 * N_REFS
            assert registry.verify() == []
        else:
            for name, rows in tables.items():
                if name != "schema_version":
                    assert rows == [], f"{name} keeps rows of a character that does not exist"
        registry.gc(grace_s=0)
        assert set(registry.blobs.digests()) == registry.referenced_digests()
        assert registry.blobs.temp_files() == []
        if not present:
            assert registry.blobs.files() == []
        return present
    finally:
        registry.close()


@pytest.mark.parametrize(
    ("pause_at", "expect_present"),
    [
        ("blob:0", False),
        (f"blob:{N_REFS // 2}", False),
        ("blobs", False),
        ("commit", False),
        ("after_commit", True),
    ],
)
def test_kill_at_hook_points(tmp_path: Path, pause_at: str, expect_present: bool) -> None:
    home = tmp_path / "home"
    proc = start_child(home, pause_at)
    assert read_line(proc) == "READY"
    assert read_line(proc) == f"PAUSED {pause_at}"
    kill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert check_all_or_nothing(home) is expect_present


def test_kill_at_random_moments(tmp_path: Path) -> None:
    # how long a registration takes here, measured by one run to the end
    home = tmp_path / "full"
    proc = start_child(home, "none")
    assert read_line(proc) == "READY"
    done = read_line(proc)
    assert done.startswith("DONE"), done
    duration = float(done.split()[1])
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    assert check_all_or_nothing(home) is True

    rng = random.Random(20240501)
    outcomes = []
    for attempt in range(6):
        home = tmp_path / f"random-{attempt}"
        proc = start_child(home, "none")
        assert read_line(proc) == "READY"
        time.sleep(rng.uniform(0.0, 1.2 * duration))
        kill(proc)
        outcomes.append(check_all_or_nothing(home))
    # every outcome was checked above; whichever it was, it was all or nothing
    assert len(outcomes) == 6
    print("random-kill outcomes (present?):", outcomes)
