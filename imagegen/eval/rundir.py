"""The run directory: what ``eval run`` and ``eval score`` write, and how ``compare`` reads it back.

Layout (the same for both commands)::

    RUN_DIR/
      metrics.json   verdict, thresholds, gates, set metrics (overall / per character / per tag),
                     skipped cells, comparison with a baseline, and ``images``: one entry per file
                     with exactly file, character, face_found, similarity, passed, reasons
      scores.json    every per-image detail (similarity to each character, copy and leakage
                     values, tags, grid key, render metadata); what ``compare`` resamples
      report.html    self-contained report (images and plots embedded as base64)
      junit.xml      gates and images as JUnit test cases, for any CI
      run.json       what ran: kind, suite, backend and model version, identities, timings, paths
      suite.yaml     (eval run) the suite as validated
      renders/       (eval run) the rendered PNGs, named by the cell's content hash
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen.errors import ImagegenError
from imagegen.eval.metrics import ImageScore
from imagegen.files import atomic_write

SCHEMA = "imagegen.eval/1"


class RunDirError(ImagegenError):
    code = "run_dir_error"
    field = "run"


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename)."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False, default=str)
    return write_text(path, text)


def write_text(path: Path, text: str) -> Path:
    """Write UTF-8 text atomically (temp file + rename)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@dataclass
class LoadedRun:
    path: Path
    metrics: dict[str, Any]
    scores: list[ImageScore]
    run: dict[str, Any]

    @property
    def n_characters(self) -> int:
        return len(self.run.get("identities") or self.metrics.get("characters") or {})

    @property
    def images_root(self) -> Path:
        root = self.run.get("images_root")
        return Path(root) if root else self.path


def read_run(path: Path) -> LoadedRun:
    """A run directory written by ``eval run`` or ``eval score``."""
    path = Path(path)
    files = {name: path / name for name in ("metrics.json", "scores.json", "run.json")}
    missing = [name for name, p in files.items() if not p.is_file()]
    if missing:
        raise RunDirError(
            f"{path} is not an evaluation run directory (missing {', '.join(missing)}); give a directory "
            "written by `imagegen eval run` or `imagegen eval score`"
        )
    try:
        metrics = json.loads(files["metrics.json"].read_text())
        details = json.loads(files["scores.json"].read_text())
        run = json.loads(files["run.json"].read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirError(f"cannot read the run directory {path}: {exc}") from exc
    if metrics.get("schema") != SCHEMA:
        raise RunDirError(f"{path}/metrics.json has schema {metrics.get('schema')!r}, expected {SCHEMA!r}")
    return LoadedRun(path, metrics, [ImageScore.from_dict(d) for d in details.get("images", [])], run)
