"""Small statistics the evaluation needs: percentile bootstrap, ROC AUC, equal error rate.

The bootstrap is :func:`scipy.stats.bootstrap` and the AUC is the Mann-Whitney U statistic of
:func:`scipy.stats.mannwhitneyu`; the equal error rate is read off the ROC curve here (scipy has
none, and the project takes no scikit-learn). Bootstraps are seeded, so a run's confidence
intervals are reproducible: the same scores and seed give the same interval on every machine.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import DegenerateDataWarning, bootstrap, mannwhitneyu

#: resamples per bootstrap unless the suite asks otherwise
DEFAULT_BOOTSTRAP = 1000
#: confidence level of every interval
CONFIDENCE = 0.95


def finite_or_none(value: float | None, digits: int = 4) -> float | None:
    """``value`` rounded, or None for None / NaN / inf (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def bootstrap_ci(
    n: int,
    statistic: Callable[[np.ndarray], np.ndarray],
    *,
    samples: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of a statistic over ``n`` units (images, usually).

    ``statistic`` gets an index matrix of shape ``(samples, n)`` (each row one resample, with
    replacement) and returns one value per row. The resamples are drawn by
    :func:`scipy.stats.bootstrap` (``method="percentile"``, seeded with ``seed``), which resamples
    the unit indices ``0..n-1`` and hands them all to ``statistic`` in one call.

    The interval's percentiles are taken here, over the finite values only: scipy's own
    ``confidence_interval`` turns NaN as soon as one resample is NaN (e.g. a resample without
    any face), and such resamples are dropped instead. With every resample finite the two are
    the same numbers. A single unit (scipy wants two) resamples to itself. None when ``n`` is 0
    or every resample is NaN.
    """
    if n <= 0 or samples <= 0:
        return None

    def values_of(index: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(statistic(index), dtype=np.float64).reshape(-1)

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", DegenerateDataWarning)
        if n == 1:
            values = values_of(np.zeros((samples, 1), dtype=np.intp))
        else:
            values = bootstrap(
                (np.arange(n),),
                values_of,
                vectorized=True,
                n_resamples=samples,
                confidence_level=confidence,
                method="percentile",
                rng=np.random.default_rng(seed),
            ).bootstrap_distribution
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Row means ignoring NaN; NaN for an all-NaN row (without a warning)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=-1)


def nanpercentile_rows(x: np.ndarray, q: float) -> np.ndarray:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(x, q, axis=-1)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(a same pair scores above a different pair), ties count half.

    That is exactly the Mann-Whitney U of the same pairs against the different pairs over
    ``n_same * n_different``. NaN without both kinds of pairs.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    # the p-value is not used; the asymptotic one is the cheapest to compute alongside U
    return float(mannwhitneyu(pos, neg, method="asymptotic").statistic) / (pos.size * neg.size)


@dataclass(frozen=True)
class ErrorRates:
    """Equal error rate of a verifier and the threshold where it is reached."""

    eer: float
    threshold: float
    #: False acceptance / false rejection rates at ``threshold`` (accept = score >= threshold)
    far: float
    frr: float


def equal_error_rate(scores: np.ndarray, labels: np.ndarray) -> ErrorRates:
    """The operating point where false accepts (different pairs >= t) equal false rejects (same < t).

    The ROC curve is evaluated at every distinct score as threshold; the threshold is the one
    where the two rates are closest, and EER is their mean there. Separable scores (every same
    pair above every different pair) give EER 0 and the threshold halfway between the best
    different pair and the worst same pair: the choice with the most margin on both sides,
    where the ROC curve alone would pick the worst same pair. NaN without both kinds of pairs.

    Hand-written: scipy has no ROC curve, and the project takes no scikit-learn for one.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    pos, neg = np.sort(scores[labels]), np.sort(scores[~labels])
    if pos.size == 0 or neg.size == 0:
        nan = float("nan")
        return ErrorRates(nan, nan, nan, nan)
    if neg[-1] < pos[0]:
        return ErrorRates(0.0, float((neg[-1] + pos[0]) / 2), 0.0, 0.0)
    candidates = np.unique(scores)
    # accept when score >= t
    far = 1.0 - np.searchsorted(neg, candidates, side="left") / neg.size
    frr = np.searchsorted(pos, candidates, side="left") / pos.size
    i = int(np.argmin(np.abs(far - frr)))
    return ErrorRates(float((far[i] + frr[i]) / 2), float(candidates[i]), float(far[i]), float(frr[i]))
