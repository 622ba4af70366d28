"""Consistency metrics, per image and per set, over any face backend.

Every comparison goes through :mod:`imagegen.faces.similarity` (the backend's own metric), and
every threshold comes from :class:`~imagegen.eval.thresholds.ResolvedThresholds`: nothing here
knows whether similarity is a cosine or ``1 - distance``.

Per image (:class:`ImageScore`), for a render meant to show character *c*:

- ``face_found``: the backend detected a face (the largest face is scored; others are counted).
- ``similarity``: similarity of the face to *c*'s reference centroid.
- ``reference_similarity``: the highest similarity to any *single* reference image of *c*;
  at or above the copy bound the render is a **copy-paste** of that reference.
- ``similarities``: to the centroid of every character of the suite; ``nearest_other`` is the
  most similar *other* character (identity **leakage**), ``identified_as`` the rank-1 answer.
- ``passed`` / ``reasons``: fails on no face, similarity below the threshold, copy-paste, or
  (with two characters or more) being identified as another character.

Per set (a character, a tag value, the whole run), :func:`set_metrics`:

- ``detection_rate`` = images with a face / images;
- ``mean_similarity``, ``min_similarity``, ``p10_similarity`` (10th percentile) over faces;
- ``pass_rate`` = passing images / images;
- ``copy_rate`` = faces at or above the copy bound / faces;
- ``rank1_accuracy`` = faces whose nearest centroid is their own character / faces (two
  characters or more); ``leakage`` = mean similarity to the nearest other character;
- ``pairwise_mean`` / ``pairwise_min``: similarity between the set's faces, every pair once;
- ``verification``: ROC AUC and EER (with its threshold) of "same character?" decided by the
  similarity of two renders, over every same/different-character pair of renders.

Headline numbers carry percentile-bootstrap 95% intervals over images (seeded): a resample
draws images with replacement and recomputes the metric (pairs follow their images).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imagegen.eval.identities import CharacterIdentity
from imagegen.eval.stats import (
    DEFAULT_BOOTSTRAP,
    bootstrap_ci,
    equal_error_rate,
    finite_or_none,
    nanmean_rows,
    nanpercentile_rows,
    roc_auc,
)
from imagegen.eval.thresholds import Gates, ResolvedThresholds
from imagegen.faces import FaceResult, similarities

PUBLIC_IMAGE_KEYS = ("file", "character", "face_found", "similarity", "passed", "reasons")


# -- per image -------------------------------------------------------------------------------------
@dataclass
class ImageScore:
    """One scored image; :meth:`public` is its entry in ``metrics.json``'s ``images``."""

    file: str
    character: str
    face_found: bool
    face_count: int = 0
    similarity: float | None = None
    reference_similarity: float | None = None
    nearest_reference: str | None = None
    similarities: dict[str, float] = field(default_factory=dict)
    nearest_other: str | None = None
    nearest_other_similarity: float | None = None
    identified_as: str | None = None
    is_copy: bool = False
    passed: bool = False
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    #: identifies the grid cell (same key in two runs = the same request), for paired comparisons
    key: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: "nan" / "black" when the render itself was unusable
    problem: str | None = None
    bbox: list[float] | None = None
    det_score: float | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "character": self.character,
            "face_found": self.face_found,
            "similarity": finite_or_none(self.similarity),
            "passed": self.passed,
            "reasons": list(self.reasons),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything but the embedding (``scores.json``)."""
        return {
            **self.public(),
            "face_count": self.face_count,
            "reference_similarity": finite_or_none(self.reference_similarity),
            "nearest_reference": self.nearest_reference,
            "similarities": {k: finite_or_none(v) for k, v in self.similarities.items()},
            "nearest_other": self.nearest_other,
            "nearest_other_similarity": finite_or_none(self.nearest_other_similarity),
            "identified_as": self.identified_as,
            "is_copy": self.is_copy,
            "warnings": list(self.warnings),
            "tags": dict(self.tags),
            "key": self.key,
            "meta": self.meta,
            "problem": self.problem,
            "bbox": self.bbox,
            "det_score": finite_or_none(self.det_score),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageScore:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "embedding"}
        known["similarities"] = {k: v for k, v in (known.get("similarities") or {}).items() if v is not None}
        return cls(**known)


def score_image(
    result: FaceResult | None,
    character: str,
    identities: Mapping[str, CharacterIdentity],
    thresholds: ResolvedThresholds,
    *,
    file: str = "",
    tags: Mapping[str, str] | None = None,
    key: str | None = None,
    meta: Mapping[str, Any] | None = None,
    problem: str | None = None,
) -> ImageScore:
    """Score one image's analysis against ``character`` (``result`` None = no usable image)."""
    if character not in identities:
        raise KeyError(f"no identity for character {character!r}")
    score = ImageScore(
        file=file,
        character=character,
        face_found=False,
        tags=dict(tags or {}),
        key=key,
        meta=dict(meta or {}),
        problem=problem,
    )
    if problem is not None:
        score.reasons.append(f"render unusable ({problem}): nothing to score")
        return score
    face = None if result is None else result.face
    if face is None or face.embedding is None:
        score.reasons.append("no face detected")
        return score
    own = identities[character]
    backend = thresholds.backend
    score.face_found = True
    score.face_count = result.count
    score.embedding = face.embedding
    score.bbox = [round(float(v), 1) for v in face.bbox]
    score.det_score = float(face.det_score)
    if result.multiple:
        score.warnings.append(f"{result.count} faces in the image; the largest was scored")

    names = list(identities)
    to_centroids = similarities(face.embedding, [identities[n].centroid for n in names], backend)
    score.similarities = {n: float(v) for n, v in zip(names, to_centroids, strict=True)}
    score.similarity = score.similarities[character]
    if len(own.references):
        to_refs = similarities(face.embedding, list(own.references), backend)
        best = int(np.argmax(to_refs))
        score.reference_similarity = float(to_refs[best])
        score.nearest_reference = own.reference_names[best] if own.reference_names else f"reference {best}"
    others = {n: v for n, v in score.similarities.items() if n != character}
    if others:
        score.nearest_other = max(others, key=others.__getitem__)
        score.nearest_other_similarity = others[score.nearest_other]
    score.identified_as = max(score.similarities, key=score.similarities.__getitem__)

    if score.similarity < thresholds.similarity:
        score.reasons.append(
            f"similarity {score.similarity:.3f} to {character}'s reference centroid is below the "
            f"{backend} threshold {thresholds.similarity:.3f}"
        )
    if thresholds.copy_bound is not None and score.reference_similarity is not None:
        if score.reference_similarity >= thresholds.copy_bound:
            score.is_copy = True
            score.reasons.append(
                f"copy-paste: similarity {score.reference_similarity:.3f} to the single reference "
                f"{score.nearest_reference} is at or above the copy bound {thresholds.copy_bound:.2f} "
                "(closer than a real second photo of a person)"
            )
    if others and score.identified_as != character:
        score.reasons.append(
            f"identity leakage: looks more like {score.identified_as} "
            f"({score.similarities[score.identified_as]:.3f}) than {character} ({score.similarity:.3f})"
        )
    score.passed = not score.reasons
    return score


def score_results(
    results: Sequence[FaceResult | None],
    characters: Sequence[str],
    identities: Mapping[str, CharacterIdentity],
    thresholds: ResolvedThresholds,
    *,
    files: Sequence[str] | None = None,
    tags: Sequence[Mapping[str, str]] | None = None,
) -> list[ImageScore]:
    """:func:`score_image` over a list (``characters[i]`` is who image ``i`` should show)."""
    return [
        score_image(
            result,
            characters[i],
            identities,
            thresholds,
            file=files[i] if files else f"image-{i}",
            tags=tags[i] if tags else None,
        )
        for i, result in enumerate(results)
    ]


# -- per-image arrays and the metrics computed from them -------------------------------------------
@dataclass
class ImageArrays:
    """Per-image values as arrays (NaN where undefined), what bootstraps and comparisons resample."""

    found: np.ndarray
    similarity: np.ndarray
    passed: np.ndarray
    copy: np.ndarray
    rank1: np.ndarray
    leakage: np.ndarray

    @classmethod
    def from_scores(cls, scores: Sequence[ImageScore], n_characters: int) -> ImageArrays:
        nan = float("nan")

        def value(x: float | None) -> float:
            return nan if x is None else float(x)

        return cls(
            found=np.array([s.face_found for s in scores], dtype=np.float64),
            similarity=np.array([value(s.similarity) if s.face_found else nan for s in scores]),
            passed=np.array([s.passed for s in scores], dtype=np.float64),
            copy=np.array(
                [float(s.is_copy) if s.face_found and s.reference_similarity is not None else nan for s in scores]
            ),
            rank1=np.array(
                [float(s.identified_as == s.character) if s.face_found and n_characters >= 2 else nan for s in scores]
            ),
            leakage=np.array([value(s.nearest_other_similarity) if s.face_found else nan for s in scores]),
        )

    def __len__(self) -> int:
        return int(self.found.shape[0])


@dataclass(frozen=True)
class MetricDef:
    """A per-image-derived set metric: how to compute it over resampled index rows."""

    name: str
    compute: Callable[[ImageArrays, np.ndarray], np.ndarray]
    higher_is_better: bool
    #: smallest change that counts as a regression in ``compare`` (on the metric's own scale)
    min_effect: float
    description: str


def _rate(attr: str) -> Callable[[ImageArrays, np.ndarray], np.ndarray]:
    return lambda a, idx: nanmean_rows(getattr(a, attr)[idx])


METRICS: dict[str, MetricDef] = {
    m.name: m
    for m in (
        MetricDef("detection_rate", _rate("found"), True, 0.05, "images with a face / images"),
        MetricDef("mean_similarity", _rate("similarity"), True, 0.02, "mean similarity to the centroid (faces)"),
        MetricDef(
            "p10_similarity",
            lambda a, idx: nanpercentile_rows(a.similarity[idx], 10),
            True,
            0.02,
            "10th percentile of similarity to the centroid (faces)",
        ),
        MetricDef("pass_rate", _rate("passed"), True, 0.05, "passing images / images"),
        MetricDef("copy_rate", _rate("copy"), False, 0.05, "faces at or above the copy bound / faces"),
        MetricDef("rank1_accuracy", _rate("rank1"), True, 0.05, "faces identified as their own character / faces"),
        MetricDef("leakage", _rate("leakage"), False, 0.02, "mean similarity to the nearest other character"),
    )
}
#: metrics reported with a bootstrap interval
HEADLINE = ("detection_rate", "mean_similarity", "p10_similarity", "pass_rate", "copy_rate", "rank1_accuracy")


def point(metric: MetricDef, arrays: ImageArrays) -> float:
    if len(arrays) == 0:
        return float("nan")
    return float(metric.compute(arrays, np.arange(len(arrays))[None, :])[0])


# -- pairs -----------------------------------------------------------------------------------------
def pairwise_matrix(embeddings: Sequence[np.ndarray], backend: str) -> np.ndarray:
    """Similarity of every embedding to every other, ``(n, n)``, with the backend's metric."""
    n = len(embeddings)
    out = np.ones((n, n), dtype=np.float64)
    for i in range(n):
        out[i] = similarities(embeddings[i], list(embeddings), backend)
    return out


def verification(matrix: np.ndarray, labels: Sequence[str], rows: np.ndarray | None = None) -> dict[str, Any]:
    """ROC AUC and EER of "same character?" over every pair of faces (``i < j``).

    ``rows`` (a boolean mask) keeps only pairs with at least one member in it: a character's
    own verification is its same pairs against its pairs with every other character.
    """
    labels = np.asarray(labels)
    n = len(labels)
    iu, ju = np.triu_indices(n, 1)
    if rows is not None:
        keep = rows[iu] | rows[ju]
        iu, ju = iu[keep], ju[keep]
    scores = matrix[iu, ju]
    same = labels[iu] == labels[ju]
    rates = equal_error_rate(scores, same)
    return {
        "auc": finite_or_none(roc_auc(scores, same)),
        "eer": finite_or_none(rates.eer),
        "eer_threshold": finite_or_none(rates.threshold),
        "same_pairs": int(same.sum()),
        "different_pairs": int((~same).sum()),
    }


#: work budget of the AUC bootstrap (pairs x resamples); big runs get fewer resamples
AUC_BOOTSTRAP_WORK = 4_000_000
AUC_BOOTSTRAP_MAX = 200


def _auc_ci(matrix: np.ndarray, labels: np.ndarray, rows: np.ndarray | None, samples: int, seed: int):
    """Bootstrap interval of the AUC, resampling faces (their pairs follow them)."""
    n = len(labels)
    if n < 3 or samples <= 0:
        return None
    samples = int(min(samples, AUC_BOOTSTRAP_MAX, max(20, AUC_BOOTSTRAP_WORK // max(1, n * n // 2))))
    iu, ju = np.triu_indices(n, 1)

    def stat(index: np.ndarray) -> np.ndarray:
        out = np.empty(index.shape[0])
        for b, idx in enumerate(index):
            a, c = idx[iu], idx[ju]
            keep = a != c  # a face drawn twice is not a pair with itself
            if rows is not None:
                keep &= rows[a] | rows[c]
            out[b] = roc_auc(matrix[a[keep], c[keep]], labels[a[keep]] == labels[c[keep]])
        return out

    return bootstrap_ci(n, stat, samples=samples, seed=seed)


@dataclass
class PairContext:
    """Every face of a run with its pairwise similarity matrix, computed once per evaluation."""

    scores: list[ImageScore]
    matrix: np.ndarray
    labels: np.ndarray
    row_of: dict[int, int]

    @classmethod
    def build(cls, scores: Sequence[ImageScore], backend: str) -> PairContext:
        faces = [s for s in scores if s.face_found and s.embedding is not None]
        matrix = pairwise_matrix([s.embedding for s in faces], backend) if faces else np.zeros((0, 0))
        return cls(faces, matrix, np.array([s.character for s in faces]), {id(s): i for i, s in enumerate(faces)})

    def rows(self, scores: Sequence[ImageScore]) -> np.ndarray:
        mask = np.zeros(len(self.scores), dtype=bool)
        for s in scores:
            row = self.row_of.get(id(s))
            if row is not None:
                mask[row] = True
        return mask


# -- sets ------------------------------------------------------------------------------------------
def set_metrics(
    scores: Sequence[ImageScore],
    thresholds: ResolvedThresholds,
    *,
    n_characters: int,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    pairs: PairContext | None = None,
    auc_ci: bool = True,
) -> dict[str, Any]:
    """Every set metric of ``scores`` (see the module docstring), JSON-ready.

    ``pairs``: the faces of the whole run (default: this set alone). Verification then uses every
    pair with at least one face of this set, so a character's same pairs are weighed against its
    pairs with the other characters.
    """
    arrays = ImageArrays.from_scores(scores, n_characters)
    n = len(scores)
    faces = [s for s in scores if s.face_found]
    out: dict[str, Any] = {"n_images": n, "n_faces": len(faces)}
    for name, metric in METRICS.items():
        out[name] = finite_or_none(point(metric, arrays))
    sims = arrays.similarity[np.isfinite(arrays.similarity)]
    out["min_similarity"] = finite_or_none(float(sims.min())) if sims.size else None
    out["max_leakage"] = finite_or_none(float(np.nanmax(arrays.leakage))) if np.isfinite(arrays.leakage).any() else None
    out["ci"] = {}
    for i, name in enumerate(HEADLINE):
        metric = METRICS[name]
        if out[name] is None:
            out["ci"][name] = None
            continue
        ci = bootstrap_ci(n, lambda idx, m=metric: m.compute(arrays, idx), samples=bootstrap, seed=seed + i)
        out["ci"][name] = None if ci is None else [finite_or_none(ci[0]), finite_or_none(ci[1])]

    restrict = pairs is not None
    ctx = pairs if pairs is not None else PairContext.build(scores, thresholds.backend)
    rows = ctx.rows(scores)
    inside = np.flatnonzero(rows)
    if inside.size >= 2:
        sub = ctx.matrix[np.ix_(inside, inside)]
        upper = sub[np.triu_indices(inside.size, 1)]
        out["pairwise_mean"] = finite_or_none(float(upper.mean()))
        out["pairwise_min"] = finite_or_none(float(upper.min()))
    else:
        out["pairwise_mean"] = out["pairwise_min"] = None

    out["verification"] = None
    if n_characters >= 2 and len(ctx.scores) >= 2 and inside.size:
        mask = rows if restrict else None
        matrix, labels = ctx.matrix, ctx.labels
        if not restrict:  # the set's own faces only
            matrix, labels, mask = ctx.matrix[np.ix_(inside, inside)], ctx.labels[inside], None
        ver = verification(matrix, labels, mask)
        if ver["auc"] is not None and auc_ci:
            ci = _auc_ci(matrix, labels, mask, bootstrap, seed)
            ver["auc_ci"] = None if ci is None else [finite_or_none(ci[0]), finite_or_none(ci[1])]
        out["verification"] = ver
    return out


@dataclass
class GateCheck:
    name: str
    metric: str
    value: float | None
    limit: float
    op: str  # ">=" or "<="
    #: None when the metric is not measurable (e.g. no face at all)
    passed: bool | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "value": self.value,
            "limit": self.limit,
            "op": self.op,
            "passed": self.passed,
        }


def gate_checks(
    metrics: Mapping[str, Any], gates: Gates, thresholds: ResolvedThresholds, n_characters: int
) -> list[GateCheck]:
    """The gates that apply to a set, each with its value and outcome."""
    wanted: list[tuple[str, float | None, str]] = [
        ("detection_rate", gates.min_detection_rate, ">="),
        (
            "mean_similarity",
            gates.min_mean_similarity if gates.min_mean_similarity is not None else thresholds.similarity,
            ">=",
        ),
        ("p10_similarity", gates.min_p10_similarity, ">="),
        ("pass_rate", gates.min_pass_rate, ">="),
        ("copy_rate", gates.max_copy_rate if thresholds.copy_bound is not None else None, "<="),
        ("rank1_accuracy", gates.min_rank1_accuracy if n_characters >= 2 else None, ">="),
    ]
    checks = []
    for metric, limit, op in wanted:
        if limit is None:
            continue
        value = metrics.get(metric)
        ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
        checks.append(GateCheck(f"{metric} {op} {limit:g}", metric, value, float(limit), op, ok))
    return checks


def verdict_of(
    metrics: Mapping[str, Any], checks: Sequence[GateCheck], *, gated: bool, what: str
) -> tuple[str, list[str]]:
    """``pass`` / ``fail`` / ``ungated`` and the reasons, in words a person acts on."""
    reasons = []
    n, faces = metrics["n_images"], metrics["n_faces"]
    if n == 0:
        reasons.append(f"{what}: no image was scored")
    elif faces == 0:
        reasons.append(
            f"{what}: no face detected in any of the {n} images (detection rate 0%): similarity, "
            "copy-paste and leakage cannot be measured"
        )
    for check in checks:
        if check.passed is False:
            reasons.append(f"{what}: {check.metric} {check.value:.3f} fails {check.name}")
    failed = bool(reasons)
    if not gated:
        return "ungated", [f"(not gated) {r}" for r in reasons]
    return ("fail" if failed else "pass"), reasons


# -- a whole evaluation ----------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Scores + metrics of a run or a scored directory: what metrics.json and the report show."""

    scores: list[ImageScore]
    thresholds: ResolvedThresholds
    gates: Gates
    gated: bool
    characters: list[str]
    overall: dict[str, Any]
    per_character: dict[str, dict[str, Any]]
    per_tag: dict[str, dict[str, dict[str, Any]]]
    verdict: str
    reasons: list[str]
    summary: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "summary": self.summary,
            "reasons": self.reasons,
            "gated": self.gated,
            "thresholds": self.thresholds.to_dict(),
            "gates": self.gates.model_dump(),
            "characters": self.per_character,
            "overall": self.overall,
            "tags": self.per_tag,
            "images": [s.public() for s in self.scores],
        }


def evaluate(
    scores: Sequence[ImageScore],
    thresholds: ResolvedThresholds,
    gates: Gates | None = None,
    *,
    characters: Sequence[str] | None = None,
    gated: bool = True,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    what: str = "run",
) -> Evaluation:
    """Set metrics overall, per character and per tag value, gate checks and verdicts."""
    gates = gates or Gates()
    scores = list(scores)
    names = list(characters) if characters else sorted({s.character for s in scores})
    k = len(names)
    pairs = PairContext.build(scores, thresholds.backend)
    overall = set_metrics(scores, thresholds, n_characters=k, bootstrap=bootstrap, seed=seed, pairs=pairs)
    checks = gate_checks(overall, gates, thresholds, k)
    overall["gates"] = [c.to_dict() for c in checks]
    per_character: dict[str, dict[str, Any]] = {}
    all_reasons: list[str] = []
    for name in names:
        mine = [s for s in scores if s.character == name]
        if not mine:  # a character only compared against (leakage), never rendered
            continue
        m = set_metrics(mine, thresholds, n_characters=k, bootstrap=bootstrap, seed=seed, pairs=pairs)
        c_checks = gate_checks(m, gates, thresholds, k)
        m["gates"] = [c.to_dict() for c in c_checks]
        m["verdict"], m["reasons"] = verdict_of(m, c_checks, gated=gated, what=name)
        per_character[name] = m
        all_reasons.extend(m["reasons"])
    overall["verdict"], overall_reasons = verdict_of(overall, checks, gated=gated, what="overall")
    overall["reasons"] = overall_reasons
    per_tag: dict[str, dict[str, dict[str, Any]]] = {}
    tag_names = sorted({t for s in scores for t in s.tags})
    for tag in tag_names:
        values = sorted({s.tags[tag] for s in scores if tag in s.tags})
        per_tag[tag] = {}
        for value in values:
            group = [s for s in scores if s.tags.get(tag) == value]
            per_tag[tag][value] = set_metrics(
                group, thresholds, n_characters=k, bootstrap=bootstrap, seed=seed, pairs=pairs, auc_ci=False
            )
    if gated:
        verdict = "fail" if any(m["verdict"] == "fail" for m in per_character.values()) else "pass"
        if overall["verdict"] == "fail":
            verdict = "fail"
    else:
        verdict = "ungated"
    reasons = all_reasons + overall_reasons
    summary = _summary(verdict, overall, scores, gated)
    return Evaluation(
        scores=scores,
        thresholds=thresholds,
        gates=gates,
        gated=gated,
        characters=names,
        overall=overall,
        per_character=per_character,
        per_tag=per_tag,
        verdict=verdict,
        reasons=reasons,
        summary=summary,
    )


def _summary(verdict: str, overall: Mapping[str, Any], scores: Sequence[ImageScore], gated: bool) -> str:
    n, faces = overall["n_images"], overall["n_faces"]
    failed = sum(not s.passed for s in scores)
    if n == 0:
        return f"{verdict.upper()}: nothing was scored"
    if not gated:
        detail = (
            "no face detected in any render (expected from random-weight tiny presets, which render noise)"
            if faces == 0
            else f"{faces} of {n} images have a face, {failed} would fail the per-image checks"
        )
        return f"UNGATED: the pipeline ran end to end and scored {n} images; {detail}; thresholds were not gated"
    mean = overall.get("mean_similarity")
    mean_text = "n/a" if mean is None else f"{mean:.3f}"
    if faces == 0:
        return f"FAIL: no face detected in any of the {n} images (detection rate 0%)"
    return (
        f"{verdict.upper()}: {n} images, detection {overall['detection_rate']:.0%}, mean similarity {mean_text}, "
        f"{failed} failing image(s)"
    )


def is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
