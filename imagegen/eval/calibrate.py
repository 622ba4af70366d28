"""Calibrate a backend's same-identity threshold from labelled pairs: its equal-error-rate point.

Input, either:

- **pairs**: a YAML/JSON list of ``{a: FILE, b: FILE, same: true|false}`` or a CSV with the
  header ``a,b,same``;
- **labels**: images labelled with who they show, a YAML/JSON mapping ``FILE: LABEL`` or a list of
  ``{file: FILE, label: LABEL}``; every pair of images becomes a same (equal labels) or
  different pair.

Paths are relative to the file that lists them. Every image is analysed once with the backend;
pairs with an image without a face are left out (and counted). The result is the EER threshold
(see :func:`imagegen.eval.stats.equal_error_rate`), the AUC, and the error rates there; it is
written to the thresholds file under the backend's family, where suites and gates pick it up.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from imagegen.errors import ConfigError, ImagegenError
from imagegen.eval.stats import equal_error_rate, finite_or_none, roc_auc
from imagegen.eval.thresholds import write_thresholds_file
from imagegen.faces import metric_for, similarity
from imagegen.faces.similarity import EmbeddingLike

Pair = tuple[Path, Path, bool]


class CalibrationError(ImagegenError):
    code = "calibration_error"


@dataclass
class Calibration:
    backend: str
    model_version: str
    same_pairs: int
    different_pairs: int
    auc: float | None
    eer: float | None
    threshold: float | None
    far: float | None
    frr: float | None
    #: pairs left out because an image had no face
    pairs_without_face: int = 0
    images_without_face: list[str] = field(default_factory=list)

    def to_entry(self, source: str) -> dict[str, Any]:
        """What goes into the thresholds file for this backend."""
        return {
            "similarity": self.threshold,
            "eer": self.eer,
            "auc": self.auc,
            "far": self.far,
            "frr": self.frr,
            "pairs": {"same": self.same_pairs, "different": self.different_pairs},
            "model_version": self.model_version,
            "calibrated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": source,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate_embeddings(
    pairs: list[tuple[EmbeddingLike, EmbeddingLike, bool]], backend: str, model_version: str = ""
) -> Calibration:
    """EER threshold of ``backend`` from embedding pairs labelled same (True) / different (False)."""
    family = metric_for(backend).backend
    scores = np.array([similarity(a, b, family) for a, b, _ in pairs], dtype=np.float64)
    labels = np.array([same for _, _, same in pairs], dtype=bool)
    if labels.all() or not labels.any():
        raise CalibrationError(
            f"calibration needs both same-person and different-person pairs; got {int(labels.sum())} same and "
            f"{int((~labels).sum())} different pairs with a face on both sides"
        )
    rates = equal_error_rate(scores, labels)
    return Calibration(
        backend=family,
        model_version=model_version,
        same_pairs=int(labels.sum()),
        different_pairs=int((~labels).sum()),
        auc=finite_or_none(roc_auc(scores, labels)),
        eer=finite_or_none(rates.eer),
        threshold=finite_or_none(rates.threshold),
        far=finite_or_none(rates.far),
        frr=finite_or_none(rates.frr),
    )


def _read_structured(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "same", "y"):
        return True
    if text in ("0", "false", "no", "different", "n"):
        return False
    raise ConfigError(f"{where}: 'same' must be true or false, got {value!r}")


def _resolve(base: Path, name: Any, where: str) -> Path:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: expected a file name, got {name!r}")
    path = (base / name).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: no such image {path}")
    return path


def load_pairs(path: Path) -> list[Pair]:
    """Pairs from a pairs file (YAML/JSON list of {a, b, same}, or CSV a,b,same)."""
    data = _read_structured(path)
    if isinstance(data, dict) and "pairs" in data:
        data = data["pairs"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected a non-empty list of pairs {{a: FILE, b: FILE, same: true|false}}")
    pairs = []
    for i, item in enumerate(data):
        where = f"{path} pair {i}"
        if not isinstance(item, dict) or not {"a", "b", "same"} <= set(item):
            raise ConfigError(f"{where}: each pair has a, b and same")
        pairs.append(
            (
                _resolve(path.parent, item["a"], where),
                _resolve(path.parent, item["b"], where),
                _as_bool(item["same"], where),
            )
        )
    return pairs


def load_labels(path: Path) -> list[tuple[Path, str]]:
    """Labelled images from a labels file (mapping FILE: LABEL, or a list of {file, label})."""
    data = _read_structured(path)
    if isinstance(data, dict) and "images" in data:
        data = data["images"]
    items = list(data.items()) if isinstance(data, dict) else None
    if items is None and isinstance(data, list):
        items = []
        for i, entry in enumerate(data):
            if not isinstance(entry, dict) or "file" not in entry or "label" not in entry:
                raise ConfigError(f"{path} entry {i}: expected {{file: FILE, label: LABEL}}")
            items.append((entry["file"], entry["label"]))
    if not items:
        raise ConfigError(f"{path}: expected labelled images, a mapping FILE: LABEL or a list of {{file, label}}")
    return [(_resolve(path.parent, f, f"{path} {f}"), str(label)) for f, label in items]


def pairs_from_labels(labelled: list[tuple[Path, str]]) -> list[Pair]:
    return [(a, b, la == lb) for (a, la), (b, lb) in itertools.combinations(labelled, 2)]


def calibrate_pairs(pairs: list[Pair], backend: str | None = None, workers: int = 1) -> Calibration:
    """Analyse every image of ``pairs`` once and calibrate ``backend`` on the pairs with two faces."""
    from imagegen.eval.scoring import FaceScorer

    images = sorted({p for a, b, _ in pairs for p in (a, b)})
    with FaceScorer(backend, workers) as scorer:
        results = dict(zip(images, scorer.analyze(images), strict=True))
        name, version = scorer.analyzer.name, scorer.analyzer.model_version
    faces = {p: r.face for p, r in results.items() if not isinstance(r, str) and r.face is not None}
    usable = [(faces[a], faces[b], same) for a, b, same in pairs if a in faces and b in faces]
    calibration = calibrate_embeddings(usable, name, version)
    calibration.pairs_without_face = len(pairs) - len(usable)
    calibration.images_without_face = [str(p) for p in images if p not in faces]
    return calibration


def write_calibration(calibration: Calibration, path: Path, source: str) -> Path:
    if calibration.threshold is None:
        raise CalibrationError("no threshold to write: the calibration did not converge")
    return write_thresholds_file(path, calibration.backend, calibration.to_entry(source))
