"""Face analysis of image files, in this process or in worker processes.

Face analysis is CPU-bound native code (dlib, ONNX Runtime); one worker per core scales it.
Workers are spawned processes that each build their own analyser once (``get_analyzer`` of the
same backend name and the same ``IMAGEGEN_*`` settings) and return ``FaceResult`` objects.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from imagegen.faces import FaceAnalyzer, FaceResult, get_analyzer

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

_worker_analyzer: FaceAnalyzer | None = None


def _init_worker(backend: str) -> None:
    global _worker_analyzer
    logging.disable(logging.WARNING)
    _worker_analyzer = get_analyzer(backend)


def analyze_file(analyzer: FaceAnalyzer, path: str | Path) -> FaceResult | str:
    """The largest face of the image at ``path``, or a string saying why it could not be read."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        return f"unreadable image: {exc}"
    return analyzer.largest(rgb)


def _work(path: str) -> FaceResult | str:
    assert _worker_analyzer is not None
    return analyze_file(_worker_analyzer, path)


class FaceScorer:
    """Analyses image files with ``backend`` using ``workers`` processes (1 = this process).

    Use as a context manager so worker processes are started once and stopped at the end.
    """

    def __init__(self, backend: str | None = None, workers: int = 1):
        self.analyzer = get_analyzer(backend)
        self.backend = backend or self.analyzer.name
        self.workers = max(1, int(workers))
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> FaceScorer:
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(self.backend,)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def warm_up(self) -> None:
        """Start every worker and build its analyser (so a benchmark times analysis only)."""
        if self._pool is not None:
            list(self._pool.map(_noop, range(self.workers * 2)))

    def analyze(
        self, paths: Sequence[str | Path], progress: Callable[[int, int], None] | None = None
    ) -> list[FaceResult | str]:
        """One ``FaceResult`` (or an error string) per path, in order."""
        results: list[FaceResult | str | None] = [None] * len(paths)
        if self._pool is None:
            for i, path in enumerate(paths):
                results[i] = analyze_file(self.analyzer, path)
                if progress:
                    progress(i + 1, len(paths))
        else:
            futures = {self._pool.submit(_work, str(path)): i for i, path in enumerate(paths)}
            for done, future in enumerate(as_completed(futures), start=1):
                results[futures[future]] = future.result()
                if progress:
                    progress(done, len(paths))
        return [r if r is not None else "not analysed" for r in results]


def _noop(_: int) -> bool:
    return _worker_analyzer is not None


def list_images(directory: Path) -> list[Path]:
    """Every image file under ``directory`` (recursively), sorted by relative path."""
    return sorted(
        (p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(directory).as_posix(),
    )
