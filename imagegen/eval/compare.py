"""Compare two runs: per metric, overall, per character and per tag, the change with its 95% CI.

The change of a metric is ``B - A`` (B the new run, A the baseline). Its interval comes from a
bootstrap over images:

- **paired** when both groups hold the same grid cells (every image has a key and the two key
  sets are equal, as for two runs of one suite): one resample of cells is applied to both runs,
  so seed-to-seed variation cancels and small real changes become visible;
- **unpaired** otherwise (e.g. two directories scored with ``eval score``): each run is
  resampled on its own.

A change is a **significant regression** when it goes the bad way, its whole interval lies on the
bad side of zero, and it is at least the metric's minimum effect (``MetricDef.min_effect``: 0.05
for rates, 0.02 for similarities). Regressions of the gated metrics (the run's
``gates.compare``, default detection_rate, mean_similarity, pass_rate, copy_rate and
rank1_accuracy) overall or for a character make ``imagegen eval compare`` exit 1; per-tag rows
are reported and flagged but not gated (``--gate-tags`` gates them too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imagegen.eval.metrics import METRICS, ImageArrays, ImageScore, MetricDef, point
from imagegen.eval.rundir import LoadedRun
from imagegen.eval.stats import DEFAULT_BOOTSTRAP, bootstrap_ci, finite_or_none


@dataclass
class Comparison:
    baseline: str
    candidate: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)
    gated_regressions: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.gated_regressions)

    @property
    def summary(self) -> str:
        if self.gated_regressions:
            return f"{len(self.gated_regressions)} gated regression(s): " + "; ".join(self.gated_regressions[:5])
        if self.regressions:
            return f"no gated regression; {len(self.regressions)} ungated regression(s) flagged"
        return "no significant regression"

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "candidate": self.candidate,
            "summary": self.summary,
            "failed": self.failed,
            "rows": self.rows,
            "regressions": self.regressions,
            "gated_regressions": self.gated_regressions,
        }


def _delta_row(
    metric: MetricDef,
    a_scores: Sequence[ImageScore],
    b_scores: Sequence[ImageScore],
    n_a: int,
    n_b: int,
    *,
    samples: int,
    seed: int,
) -> dict[str, Any]:
    arr_a, arr_b = ImageArrays.from_scores(a_scores, n_a), ImageArrays.from_scores(b_scores, n_b)
    va, vb = point(metric, arr_a), point(metric, arr_b)
    row: dict[str, Any] = {
        "metric": metric.name,
        "a": finite_or_none(va),
        "b": finite_or_none(vb),
        "delta": None,
        "ci": None,
        "paired": False,
        "n_a": len(a_scores),
        "n_b": len(b_scores),
    }
    if not (np.isfinite(va) and np.isfinite(vb)):
        return row
    row["delta"] = finite_or_none(vb - va)
    keys_a = [s.key for s in a_scores]
    keys_b = [s.key for s in b_scores]
    paired = all(keys_a) and all(keys_b) and len(set(keys_a)) == len(keys_a) and set(keys_a) == set(keys_b)
    if paired:
        position = {k: i for i, k in enumerate(keys_b)}
        order = np.array([position[k] for k in keys_a])

        def stat(idx: np.ndarray) -> np.ndarray:
            return metric.compute(arr_b, order[idx]) - metric.compute(arr_a, idx)

        ci = bootstrap_ci(len(keys_a), stat, samples=samples, seed=seed)
    else:
        rng = np.random.default_rng(seed + 1)
        other = rng.integers(0, len(b_scores), size=(samples, len(b_scores))) if len(b_scores) else None

        def stat(idx: np.ndarray) -> np.ndarray:
            return metric.compute(arr_b, other) - metric.compute(arr_a, idx)

        ci = bootstrap_ci(len(a_scores), stat, samples=samples, seed=seed) if other is not None else None
    row["paired"] = bool(paired)
    if ci is not None:
        row["ci"] = [finite_or_none(ci[0]), finite_or_none(ci[1])]
    return row


def _flag(row: dict[str, Any], metric: MetricDef) -> None:
    row["regression"] = row["improvement"] = False
    delta, ci = row["delta"], row["ci"]
    if delta is None or ci is None or ci[0] is None:
        return
    big = abs(delta) >= metric.min_effect
    if metric.higher_is_better:
        row["regression"] = big and delta < 0 and ci[1] < 0
        row["improvement"] = big and delta > 0 and ci[0] > 0
    else:
        row["regression"] = big and delta > 0 and ci[0] > 0
        row["improvement"] = big and delta < 0 and ci[1] < 0


def compare_runs(
    baseline: LoadedRun,
    candidate: LoadedRun,
    *,
    gated_metrics: Sequence[str] | None = None,
    gate_tags: bool = False,
    samples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> Comparison:
    """Every metric of :data:`METRICS`, overall, per character and per tag value."""
    gated = (
        list(gated_metrics)
        if gated_metrics is not None
        else list((candidate.metrics.get("gates") or {}).get("compare") or [])
    )
    unknown = [g for g in gated if g not in METRICS]
    if unknown:
        from imagegen.errors import ImagegenError

        raise ImagegenError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}", field="gate")
    result = Comparison(str(baseline.path), str(candidate.path))
    n_a, n_b = baseline.n_characters, candidate.n_characters

    groups: list[tuple[str, str, list[ImageScore], list[ImageScore]]] = [
        ("overall", "all", baseline.scores, candidate.scores)
    ]
    characters = sorted({s.character for s in baseline.scores} | {s.character for s in candidate.scores})
    for name in characters:
        groups.append(
            (
                "character",
                name,
                [s for s in baseline.scores if s.character == name],
                [s for s in candidate.scores if s.character == name],
            )
        )
    tags = sorted({(t, v) for s in [*baseline.scores, *candidate.scores] for t, v in s.tags.items()})
    for tag, value in tags:
        groups.append(
            (
                "tag",
                f"{tag}={value}",
                [s for s in baseline.scores if s.tags.get(tag) == value],
                [s for s in candidate.scores if s.tags.get(tag) == value],
            )
        )
    for g_index, (scope, group, a_scores, b_scores) in enumerate(groups):
        if not a_scores or not b_scores:
            continue
        for m_index, (name, metric) in enumerate(METRICS.items()):
            row = _delta_row(metric, a_scores, b_scores, n_a, n_b, samples=samples, seed=seed + 31 * g_index + m_index)
            if row["delta"] is None:
                continue
            _flag(row, metric)
            row.update(scope=scope, group=group, gated=name in gated and (scope != "tag" or gate_tags))
            result.rows.append(row)
            if row["regression"]:
                text = (
                    f"{scope} {group}: {name} {row['a']:.3f} -> {row['b']:.3f} "
                    f"({row['delta']:+.3f}, 95% CI [{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}])"
                )
                result.regressions.append(text)
                if row["gated"]:
                    result.gated_regressions.append(text)
    return result
