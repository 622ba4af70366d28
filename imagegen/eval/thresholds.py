"""Per-backend thresholds the evaluation applies, where each comes from, and the gates of a set.

Every number here is on the *similarity* scale of a face backend (higher = more alike; see
:mod:`imagegen.faces.similarity`), so it means something only together with its backend.

Per image (``ImageThresholds``):

- ``similarity``: the least similarity to the character's reference centroid for a render to
  count as the character. Resolved in this order: the suite's ``thresholds[backend]``, then the
  calibrated value in the thresholds file (``imagegen eval calibrate`` writes
  ``configs/thresholds.yaml``; ``IMAGEGEN_EVAL_THRESHOLDS_FILE`` moves it), then the backend's
  own same-identity threshold (:func:`imagegen.faces.threshold`).
- ``copy``: the copy-paste bound. A render whose similarity to *one single* reference image is
  at or above it is closer to that photo than a real second photo of the person usually is:
  the method pasted the reference instead of rendering the person. Defaults per backend family
  (:data:`COPY_BOUNDS`), overridable in the suite and the thresholds file.

Why these copy bounds:

- ``dlib`` 0.90 (Euclidean distance 0.10). dlib's ResNet puts distinct photos of the same person
  at distances of roughly 0.25-0.55 (its "same person" operating point is 0.6); measured here,
  re-processings of *one* photo (flip, crop, light, JPEG, small rotation, downscale) of the
  bundled portraits land at similarity 0.75-0.96 and an unchanged copy at 1.0. A render at 0.90
  or above is therefore as close to a reference as an edited copy of that very photo, and closer
  than a genuine second photo gets.
- ``insightface`` 0.85 (cosine). ArcFace places genuine pairs of distinct photos mostly at
  cosine 0.4-0.8 and re-encodings of the same photo above ~0.9. Not re-measured here (the real
  packs are not installed in this environment); calibrate it on your own data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from imagegen.errors import ConfigError
from imagegen.faces import metric_for
from imagegen.settings import PROJECT_ROOT

#: copy-paste bound per backend family, on its similarity scale (see the module docstring)
COPY_BOUNDS: dict[str, float] = {"dlib": 0.90, "insightface": 0.85}
COPY_SOURCES: dict[str, str] = {
    "dlib": "dlib default: distance <= 0.10, closer than distinct photos of one person (0.25-0.55)",
    "insightface": "insightface default: cosine >= 0.85, above genuine pairs of distinct photos (0.4-0.8)",
}


class EvalSettings(BaseSettings):
    """Settings of the evaluation (``IMAGEGEN_EVAL_*``)."""

    model_config = SettingsConfigDict(env_prefix="IMAGEGEN_EVAL_", extra="ignore")

    #: calibrated thresholds per backend, written by ``imagegen eval calibrate``, read if present
    thresholds_file: Path = PROJECT_ROOT / "configs" / "thresholds.yaml"
    #: where ``imagegen eval run NAME`` looks for ``NAME.yaml``
    suites_dir: Path = PROJECT_ROOT / "configs" / "suites"


def eval_settings() -> EvalSettings:
    return EvalSettings()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageThresholds(_Strict):
    """Per-image thresholds for one backend; None means "take the next source"."""

    similarity: float | None = Field(default=None, ge=-1.0, le=1.0)
    copy_bound: float | None = Field(default=None, ge=-1.0, le=1.0, alias="copy")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Gates(_Strict):
    """What a set (a character, or the whole run) must reach to pass; None switches a gate off."""

    min_detection_rate: float | None = Field(default=0.9, ge=0, le=1)
    #: None: the per-image similarity threshold
    min_mean_similarity: float | None = None
    min_p10_similarity: float | None = None
    min_pass_rate: float | None = Field(default=0.8, ge=0, le=1)
    max_copy_rate: float | None = Field(default=0.1, ge=0, le=1)
    #: applies only when the suite has two characters or more
    min_rank1_accuracy: float | None = Field(default=0.9, ge=0, le=1)
    #: metrics whose significant regression makes ``imagegen eval compare`` exit 1
    compare: list[str] = Field(
        default_factory=lambda: ["detection_rate", "mean_similarity", "pass_rate", "copy_rate", "rank1_accuracy"]
    )


class ResolvedThresholds(BaseModel):
    """The thresholds one run applies, with where each came from."""

    backend: str
    similarity: float
    copy_bound: float | None
    similarity_source: str
    copy_source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "similarity": self.similarity,
            "copy": self.copy_bound,
            "sources": {"similarity": self.similarity_source, "copy": self.copy_source},
        }


# -- the thresholds file -----------------------------------------------------------------------------
def read_thresholds_file(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """``backends`` of the thresholds file (empty when the file does not exist)."""
    path = path or eval_settings().thresholds_file
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the thresholds file {path}: {exc}") from exc
    backends = data.get("backends", {}) if isinstance(data, dict) else None
    if not isinstance(backends, dict):
        raise ConfigError(f"{path}: expected a mapping 'backends: {{dlib: {{similarity: ...}}}}'")
    for name, entry in backends.items():
        metric_for(name)  # unknown backend -> UnknownFaceBackendError (an ImagegenError)
        try:
            ImageThresholds.model_validate({k: v for k, v in entry.items() if k in ("similarity", "copy")})
        except (ValidationError, AttributeError) as exc:
            raise ConfigError(f"{path}: thresholds of backend {name!r} are invalid: {exc}") from exc
    return backends


def write_thresholds_file(path: Path, backend: str, entry: dict[str, Any]) -> Path:
    """Store ``entry`` as the calibrated thresholds of ``backend``; other backends are kept."""
    family = metric_for(backend).backend
    existing: dict[str, Any] = {}
    if path.is_file():
        existing = yaml.safe_load(path.read_text()) or {}
    backends = dict(existing.get("backends") or {})
    backends[family] = entry
    text = (
        "# Calibrated face-similarity thresholds per backend, written by `imagegen eval calibrate`.\n"
        "# similarity: EER threshold on the backend's similarity scale (suites and gates read it).\n"
        + yaml.safe_dump({"backends": backends}, sort_keys=True)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def resolve_thresholds(
    backend: str,
    suite_thresholds: dict[str, ImageThresholds] | None = None,
    thresholds_file: Path | None = None,
) -> ResolvedThresholds:
    """The per-image thresholds of ``backend`` from the suite, the thresholds file, the defaults."""
    metric = metric_for(backend)
    family = metric.backend
    given = (suite_thresholds or {}).get(family) or (suite_thresholds or {}).get(backend) or ImageThresholds()
    file_path = thresholds_file or eval_settings().thresholds_file
    calibrated = read_thresholds_file(file_path).get(family, {})
    if given.similarity is not None:
        similarity, sim_source = given.similarity, "suite"
    elif calibrated.get("similarity") is not None:
        similarity, sim_source = float(calibrated["similarity"]), f"calibrated ({file_path})"
    else:
        similarity, sim_source = metric.threshold, f"backend default ({metric.source})"
    if given.copy_bound is not None:
        copy, copy_source = given.copy_bound, "suite"
    elif calibrated.get("copy") is not None:
        copy, copy_source = float(calibrated["copy"]), f"calibrated ({file_path})"
    else:
        copy, copy_source = COPY_BOUNDS.get(family), COPY_SOURCES.get(family, "no copy bound for this backend")
    return ResolvedThresholds(
        backend=family,
        similarity=float(similarity),
        copy_bound=None if copy is None else float(copy),
        similarity_source=sim_source,
        copy_source=copy_source,
    )
