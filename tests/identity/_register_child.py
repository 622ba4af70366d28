"""Child process for test_registry_kill: registers one character with many references.

Usage: python _register_child.py HOME N_REFS PAUSE_AT

PAUSE_AT is ``none`` (run to the end), ``blob:K`` (after the K-th blob is written), ``blobs``
(after all blobs, before the transaction), ``commit`` (rows flushed, transaction not committed)
or ``after_commit``. At a pause point the child prints ``PAUSED <point>`` and sleeps until the
parent kills it. It prints ``READY`` just before registering and ``DONE <seconds>`` at the end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from imagegen.blobstore import BlobStore  # noqa: E402
from imagegen.identity.registry import Registry  # noqa: E402
from tests.identity._helpers import make_character, make_refs  # noqa: E402

CHARACTER_ID = "kill-me"


def pause(point: str) -> None:
    print(f"PAUSED {point}", flush=True)
    time.sleep(120)
    sys.exit(3)  # the parent should have killed us by now


def main() -> None:
    home, n_refs, pause_at = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    registry = Registry(f"sqlite:///{home / 'registry.db'}", BlobStore(home / "blobs"))
    refs = make_refs(n_refs, backends=("dlib", "insightface"))
    hooks = {}
    if pause_at.startswith("blob:"):
        k = int(pause_at.split(":")[1])
        hooks["_after_blob_written"] = lambda i: pause(pause_at) if i == k else None
    elif pause_at == "blobs":
        hooks["_after_blobs_written"] = lambda: pause(pause_at)
    elif pause_at == "commit":
        hooks["_before_commit"] = lambda: pause(pause_at)
    elif pause_at == "after_commit":
        hooks["_after_commit"] = lambda: pause(pause_at)
    character = make_character(CHARACTER_ID, centroids={"dlib": [0.5] * 8})
    print("READY", flush=True)
    start = time.perf_counter()
    registry.characters.register(character, refs, **hooks)
    print(f"DONE {time.perf_counter() - start:.4f}", flush=True)


if __name__ == "__main__":
    main()
